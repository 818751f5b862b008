//! Property tests of the pool's bookkeeping on the host backend: size classes, reuse, no overlap
//! of live buffers, statistics consistent with a model, budget enforced, fragmentation bounded.

use proptest::prelude::*;
use qlora_paged_alloc::{
    size_class, Advice, PagedBuf, Pool, PoolConfig, PoolError, PoolStats, Stream, BLOCK_ALIGN,
    MIN_BLOCK_BYTES,
};

#[derive(Clone, Debug)]
enum Op {
    /// Allocate this many `u32`s.
    Alloc(usize),
    /// Drop the live buffer at this index (modulo the number of live buffers).
    Free(usize),
    /// Prefetch buffer i to the device.
    ToDevice(usize),
    /// Prefetch buffer i to the host.
    ToHost(usize),
    /// Advise on buffer i.
    Advise(usize),
    /// Release the cache.
    Trim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..5000).prop_map(Op::Alloc),
        3 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::ToDevice),
        1 => any::<usize>().prop_map(Op::ToHost),
        1 => any::<usize>().prop_map(Op::Advise),
        1 => Just(Op::Trim),
    ]
}

struct Live {
    buf: PagedBuf<u32>,
    /// The value every element was set to, to detect overlapping blocks.
    tag: u32,
    on_device: bool,
}

fn check_invariants(pool: &Pool, live: &[Live], budget: usize) -> Result<(), TestCaseError> {
    let stats = pool.stats();
    let allocated: usize = live.iter().map(|l| l.buf.len() * 4).sum();
    let in_use: usize = live.iter().map(|l| l.buf.capacity_bytes()).sum();
    prop_assert_eq!(stats.bytes_allocated, allocated);
    prop_assert_eq!(stats.bytes_in_use, in_use);
    prop_assert_eq!(stats.live_buffers, live.len());
    prop_assert!(stats.bytes_reserved >= stats.bytes_in_use);
    prop_assert!(
        stats.bytes_reserved <= budget,
        "reserved {} > budget {}",
        stats.bytes_reserved,
        budget
    );
    prop_assert_eq!(
        stats.cached_blocks == 0,
        stats.bytes_reserved == stats.bytes_in_use
    );
    prop_assert_eq!(
        stats.backend_allocations - stats.backend_releases,
        (stats.live_buffers + stats.cached_blocks) as u64
    );
    // Fragmentation bound: power-of-two classes waste less than half of each block (above the
    // 256-byte minimum).
    prop_assert!(stats.bytes_in_use < 2 * stats.bytes_allocated + MIN_BLOCK_BYTES * live.len() + 1);
    // Hinted bytes: every live buffer whose last hint went to the device, plus possibly cached
    // blocks that were on the device when freed.
    let live_on_device: usize = live
        .iter()
        .filter(|l| l.on_device)
        .map(|l| l.buf.capacity_bytes())
        .sum();
    prop_assert!(stats.bytes_hinted_device >= live_on_device);
    prop_assert!(stats.bytes_hinted_device <= stats.bytes_reserved);

    // Sizes, alignment, no overlap, contents intact.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for l in live {
        prop_assert_eq!(Some(l.buf.capacity_bytes()), size_class(l.buf.len() * 4));
        prop_assert_eq!(l.buf.address() % BLOCK_ALIGN, 0);
        prop_assert!(l.buf.as_slice().unwrap().iter().all(|&v| v == l.tag));
        prop_assert_eq!(l.buf.is_hinted_on_device(), l.on_device);
        ranges.push((l.buf.address(), l.buf.address() + l.buf.capacity_bytes()));
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        prop_assert!(pair[0].1 <= pair[1].0, "live blocks overlap: {:?}", pair);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn bookkeeping_matches_model(budget_kib in 4usize..128, ops in proptest::collection::vec(op(), 1..80)) {
        let budget = budget_kib * 1024;
        let pool = Pool::new(PoolConfig::host(budget)).unwrap();
        let mut live: Vec<Live> = Vec::new();
        // Last placement hint of each cached block, by address: a reused block keeps its pages
        // wherever they were.
        let mut cached_on_device = std::collections::HashMap::new();
        let mut next_tag = 1u32;
        for op in ops {
            match op {
                Op::Alloc(len) => {
                    let before = pool.stats();
                    let class = size_class(len * 4).unwrap();
                    let fits = class <= budget - before.bytes_in_use;
                    match pool.alloc::<u32>(len) {
                        Ok(mut buf) => {
                            prop_assert!(fits, "allocation beyond the budget succeeded");
                            prop_assert!(buf.as_slice().unwrap().iter().all(|&v| v == 0), "not zeroed");
                            let after = pool.stats();
                            let on_device = if after.reuses > before.reuses {
                                cached_on_device.remove(&buf.address()).unwrap_or(false)
                            } else {
                                false
                            };
                            // Reuse: a cached block of the class is taken before the backend is asked.
                            if after.reuses > before.reuses {
                                prop_assert_eq!(after.backend_allocations, before.backend_allocations);
                                prop_assert_eq!(after.bytes_reserved, before.bytes_reserved);
                            } else {
                                prop_assert_eq!(after.backend_allocations, before.backend_allocations + 1);
                            }
                            let tag = next_tag;
                            next_tag += 1;
                            buf.as_mut_slice().unwrap().fill(tag);
                            live.push(Live { buf, tag, on_device });
                        }
                        Err(PoolError::BudgetExceeded { class: c, in_use, budget: b, .. }) => {
                            prop_assert!(!fits, "a fitting allocation was refused");
                            prop_assert_eq!(c, class);
                            prop_assert_eq!(in_use, before.bytes_in_use);
                            prop_assert_eq!(b, budget);
                            prop_assert_eq!(pool.stats().bytes_in_use, before.bytes_in_use);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let l = live.swap_remove(i % live.len());
                    let class = l.buf.capacity_bytes();
                    cached_on_device.insert(l.buf.address(), l.on_device);
                    let before = pool.stats();
                    drop(l);
                    let after = pool.stats();
                    prop_assert_eq!(after.bytes_reserved, before.bytes_reserved, "freeing keeps the block cached");
                    prop_assert_eq!(after.cached_blocks, before.cached_blocks + 1);
                    prop_assert_eq!(after.bytes_in_use + class, before.bytes_in_use);
                }
                Op::ToDevice(i) if !live.is_empty() => {
                    let n = live.len();
                    let l = &mut live[i % n];
                    let before = pool.stats().prefetches_to_device;
                    l.buf.prefetch_to_device(&Stream::Default).unwrap();
                    l.on_device = true;
                    prop_assert_eq!(pool.stats().prefetches_to_device, before + 1);
                }
                Op::ToHost(i) if !live.is_empty() => {
                    let n = live.len();
                    let l = &mut live[i % n];
                    let before = pool.stats().prefetches_to_host;
                    l.buf.prefetch_to_host().unwrap();
                    l.on_device = false;
                    prop_assert_eq!(pool.stats().prefetches_to_host, before + 1);
                }
                Op::Advise(i) if !live.is_empty() => {
                    let n = live.len();
                    let before = pool.stats().advice_calls;
                    live[i % n].buf.advise(Advice::PreferDevice).unwrap();
                    prop_assert_eq!(pool.stats().advice_calls, before + 1);
                }
                Op::Trim => {
                    let before = pool.stats();
                    let released = pool.trim();
                    cached_on_device.clear();
                    let after = pool.stats();
                    prop_assert_eq!(after.cached_blocks, 0);
                    prop_assert_eq!(after.bytes_reserved, after.bytes_in_use);
                    prop_assert_eq!(released, before.bytes_reserved - before.bytes_in_use);
                }
                _ => {}
            }
            check_invariants(&pool, &live, budget)?;
        }
        drop(live);
        let stats = pool.stats();
        prop_assert_eq!(stats.bytes_in_use, 0);
        prop_assert_eq!(stats.bytes_allocated, 0);
        prop_assert_eq!(stats.live_buffers, 0);
    }

    #[test]
    fn size_class_is_smallest_power_of_two_at_least_256(bytes in 0usize..(1 << 40)) {
        let class = size_class(bytes).unwrap();
        prop_assert!(class.is_power_of_two());
        prop_assert!(class >= bytes && class >= MIN_BLOCK_BYTES);
        prop_assert!(class == MIN_BLOCK_BYTES || class / 2 < bytes);
    }

    #[test]
    fn same_class_reuses_the_same_block(a in 1usize..4096, b in 1usize..4096) {
        let pool = Pool::new(PoolConfig::host(1 << 20)).unwrap();
        let first = pool.alloc::<u8>(a).unwrap();
        let address = first.address();
        drop(first);
        let second = pool.alloc::<u8>(b).unwrap();
        let same_class = size_class(a) == size_class(b);
        prop_assert_eq!(second.address() == address, same_class);
        prop_assert_eq!(pool.stats().reuses, u64::from(same_class));
    }
}

#[test]
fn budget_releases_cache_before_refusing() {
    let pool = Pool::new(PoolConfig::host(4096)).unwrap();
    let a = pool.alloc::<u8>(2048).unwrap();
    let b = pool.alloc::<u8>(2048).unwrap();
    assert!(matches!(
        pool.alloc::<u8>(1),
        Err(PoolError::BudgetExceeded { .. })
    ));
    drop(a);
    drop(b);
    // Both 2 KiB blocks are cached; a 4 KiB block needs them released.
    let c = pool.alloc::<u8>(4096).unwrap();
    let stats = pool.stats();
    assert_eq!(stats.backend_releases, 2);
    assert_eq!(stats.bytes_reserved, 4096);
    drop(c);
    assert!(matches!(
        pool.alloc::<u8>(4097),
        Err(PoolError::BudgetExceeded {
            class: 8192,
            budget: 4096,
            ..
        })
    ));
}

#[test]
fn hints_track_device_bytes() {
    let pool = Pool::new(PoolConfig::host(1 << 20)).unwrap();
    let mut a = pool.alloc::<f32>(300).unwrap();
    a.prefetch_to_device(&Stream::Default).unwrap();
    a.prefetch_to_device(&Stream::Default).unwrap();
    assert_eq!(pool.stats().bytes_hinted_device, 2048);
    assert_eq!(pool.stats().prefetches_to_device, 2);
    a.prefetch_to_host().unwrap();
    a.advise(Advice::AccessedByDevice).unwrap();
    let PoolStats {
        bytes_hinted_device,
        prefetches_to_host,
        advice_calls,
        hints_skipped,
        ..
    } = pool.stats();
    assert_eq!(
        (
            bytes_hinted_device,
            prefetches_to_host,
            advice_calls,
            hints_skipped
        ),
        (0, 1, 1, 0)
    );
}

#[test]
fn bad_requests_are_typed_errors() {
    let pool = Pool::new(PoolConfig::host(1 << 20)).unwrap();
    assert!(matches!(pool.alloc::<()>(4), Err(PoolError::ZeroSizedType)));
    assert!(matches!(
        pool.alloc::<u64>(usize::MAX / 4),
        Err(PoolError::TooLarge { elem_bytes: 8, .. })
    ));
    assert!(matches!(
        pool.alloc::<u8>(usize::MAX),
        Err(PoolError::TooLarge { .. })
    ));
    assert!(matches!(
        Pool::new(PoolConfig::host(0)),
        Err(PoolError::InvalidConfig { .. })
    ));
    // Nothing leaked into the statistics.
    assert_eq!(pool.stats().bytes_reserved, 0);
}

#[test]
fn empty_buffer_is_valid() {
    let pool = Pool::new(PoolConfig::host(1024)).unwrap();
    let buf = pool.alloc::<f32>(0).unwrap();
    assert!(buf.is_empty());
    assert_eq!(buf.as_slice().unwrap().len(), 0);
    assert_eq!(buf.capacity_bytes(), MIN_BLOCK_BYTES);
}

#[test]
fn global_pool_is_created_once() {
    assert!(Pool::global().is_none() || Pool::global().is_some());
    let first = Pool::init_global(PoolConfig::host(1 << 16));
    let pool = match first {
        Ok(pool) => pool,
        Err(PoolError::GlobalAlreadyInitialized) => Pool::global().unwrap(),
        Err(e) => panic!("{e}"),
    };
    assert!(matches!(
        Pool::init_global(PoolConfig::host(1 << 16)),
        Err(PoolError::GlobalAlreadyInitialized)
    ));
    assert_eq!(
        Pool::global().unwrap().stats().budget_bytes,
        pool.stats().budget_bytes
    );
    let buf = Pool::global().unwrap().alloc::<u16>(10).unwrap();
    assert_eq!(buf.len(), 10);
}

#[cfg(all(target_pointer_width = "64", not(feature = "cuda")))]
#[test]
fn handle_overhead_is_as_documented() {
    assert_eq!(std::mem::size_of::<PagedBuf<f32>>(), 56);
}

#[test]
fn pools_and_buffers_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pool>();
    send_sync::<PagedBuf<f32>>();
    let pool = Pool::new(PoolConfig::host(1 << 20)).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let mut buf = pool.alloc::<u32>(100 + 10 * i).unwrap();
                    buf.as_mut_slice().unwrap().fill(t);
                    assert!(buf.as_slice().unwrap().iter().all(|&v| v == t));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!(
        (
            stats.live_buffers,
            stats.bytes_in_use,
            stats.bytes_allocated
        ),
        (0, 0, 0)
    );
    assert!(stats.bytes_reserved <= 1 << 20);
}
