//! The launchers on paged (CUDA managed) memory from `qlora-paged-alloc`: an 8-bit AdamW step
//! whose states live in a paged pool, prefetched to the device on the launch stream, gives
//! exactly the states and parameters of the same step on ordinary device memory.
//!
//! Skips with a message when no GPU is found; fails instead when `QLORA_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

use qlora_cuda::cudarc::driver::CudaSlice;
use qlora_cuda::{Adam8bitState, AdamParams, Device, DynamicMaps};
use qlora_double_quant::DynamicMap;
use qlora_paged_alloc::{Pool, PoolConfig, Stream};

fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            if std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("QLORA_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            eprintln!("skipping paged-memory GPU test: {e}");
            None
        }
    }
}

#[test]
fn gpu_adam8bit_on_paged_states_matches_device_states() {
    let Some(dev) = device() else { return };
    let pool = Pool::new(PoolConfig::cuda(0, 16 << 20)).expect("a GPU exists, so must the pool");
    let n: usize = 70_001;
    let blocks = n.div_ceil(256);
    let stream = dev.stream().clone();
    let init: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let mut p_dev: CudaSlice<f32> = stream.clone_htod(&init).unwrap();
    let mut p_paged: CudaSlice<f32> = stream.clone_htod(&init).unwrap();
    let mut s1: CudaSlice<u8> = stream.alloc_zeros(n).unwrap();
    let mut s2: CudaSlice<u8> = stream.alloc_zeros(n).unwrap();
    let mut a1: CudaSlice<f32> = stream.alloc_zeros(blocks).unwrap();
    let mut a2: CudaSlice<f32> = stream.alloc_zeros(blocks).unwrap();
    let mut b1: CudaSlice<f32> = stream.alloc_zeros(blocks).unwrap();
    let mut b2: CudaSlice<f32> = stream.alloc_zeros(blocks).unwrap();
    let mut ps1 = pool.alloc::<u8>(n).unwrap();
    let mut ps2 = pool.alloc::<u8>(n).unwrap();
    let q1 = stream.clone_htod(DynamicMap::signed().values()).unwrap();
    let q2 = stream.clone_htod(DynamicMap::unsigned().values()).unwrap();
    let launch_stream = Stream::Cuda(stream.clone());

    for step in 1..=3 {
        let g: Vec<f32> = (0..n)
            .map(|i| (((i * 31 + step) % 101) as f32 - 50.0) * 1e-4)
            .collect();
        let g = stream.clone_htod(&g).unwrap();
        let params = AdamParams {
            step: step as u32,
            ..AdamParams::default()
        };
        let maps = || DynamicMaps {
            signed: &q1,
            unsigned: &q2,
        };
        let state = Adam8bitState {
            state1: &mut s1,
            state2: &mut s2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        };
        dev.adam8bit_step(&mut p_dev, &g, state, maps(), &params)
            .unwrap();

        ps1.prefetch_to_device(&launch_stream).unwrap();
        ps2.prefetch_to_device(&launch_stream).unwrap();
        let mut v1 = ps1.unified_mut().unwrap().slice_mut(0..n);
        let mut v2 = ps2.unified_mut().unwrap().slice_mut(0..n);
        let state = Adam8bitState {
            state1: &mut v1,
            state2: &mut v2,
            absmax1: &mut b1,
            absmax2: &mut b2,
        };
        dev.adam8bit_step(&mut p_paged, &g, state, maps(), &params)
            .unwrap();
    }
    // Host reads of the paged buffers wait for the kernels (cudarc's event on the slice).
    assert_eq!(
        ps1.as_slice().unwrap(),
        stream.clone_dtoh(&s1).unwrap().as_slice()
    );
    assert_eq!(
        ps2.as_slice().unwrap(),
        stream.clone_dtoh(&s2).unwrap().as_slice()
    );
    assert_eq!(
        stream.clone_dtoh(&b1).unwrap(),
        stream.clone_dtoh(&a1).unwrap()
    );
    assert_eq!(
        stream.clone_dtoh(&p_paged).unwrap(),
        stream.clone_dtoh(&p_dev).unwrap()
    );
    let stats = pool.stats();
    assert_eq!(stats.live_buffers, 2);
    assert_eq!(
        stats.prefetches_to_device + stats.hints_skipped,
        6,
        "every prefetch is either issued or skipped for lack of concurrent managed access"
    );
}
