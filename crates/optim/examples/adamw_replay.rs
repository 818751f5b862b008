//! Replay a gradient trajectory through one of the optimizers and write every parameter and the
//! final state, in the layout of `tools/gen_optim_vectors.py`.
//!
//! ```text
//! cargo run --release -p qlora-optim --example adamw_replay -- IN.safetensors OUT.safetensors \
//!     --optim adamw8bit|adamw32bit|adam8bit|adam32bit --lr F --beta1 F --beta2 F --eps F \
//!     --weight-decay F
//! ```
//!
//! IN holds `p0` (the initial parameter, 1-D f32) and `grad0 … gradN-1` (1-D f32, same length).
//! OUT gets `param0 … paramN-1` (the parameter after each step) and the final state under
//! bitsandbytes' names (`state1`, `state2`, `absmax1`, `absmax2`, `qmap1`, `qmap2`, `step`).
//! Unset flags take the optimizer's bitsandbytes defaults. On any error it prints a message,
//! exits with status 1 and leaves no OUT file (it writes a temporary file and renames it).

use qlora_optim::{
    write_atomically, Adam, AdamConfig, Error, ParamUpdate, TensorData, TensorMut, TensorRef,
};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: adamw_replay IN.safetensors OUT.safetensors \
--optim adamw8bit|adamw32bit|adam8bit|adam32bit [--lr F] [--beta1 F] [--beta2 F] [--eps F] \
[--weight-decay F]";

#[derive(Debug)]
struct Args {
    input: PathBuf,
    output: PathBuf,
    config: AdamConfig,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut optim = None;
    let mut flags: Vec<(String, f64)> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            let value = it
                .next()
                .ok_or_else(|| format!("flag --{name} needs a value"))?;
            match name {
                "optim" => optim = Some(value.clone()),
                "lr" | "beta1" | "beta2" | "eps" | "weight-decay" => {
                    let v: f64 = value
                        .parse()
                        .map_err(|_| format!("--{name}: `{value}` is not a number"))?;
                    flags.push((name.to_string(), v));
                }
                _ => return Err(format!("unknown flag --{name}")),
            }
        } else {
            positional.push(PathBuf::from(a));
        }
    }
    let [input, output]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|p: Vec<PathBuf>| format!("expected IN and OUT paths, got {} paths", p.len()))?;
    let optim = optim.ok_or("missing --optim")?;
    let mut config = match optim.as_str() {
        "adamw8bit" => AdamConfig::adamw8bit(),
        "adamw32bit" => AdamConfig::adamw32bit(),
        "adam8bit" => AdamConfig::adam8bit(),
        "adam32bit" => AdamConfig::adam32bit(),
        other => return Err(format!("--optim: unknown optimizer `{other}`")),
    };
    for (name, v) in flags {
        match name.as_str() {
            "lr" => config.lr = v,
            "beta1" => config.betas.0 = v,
            "beta2" => config.betas.1 = v,
            "eps" => config.eps = v,
            _ => config.weight_decay = v,
        }
    }
    Ok(Args {
        input,
        output,
        config,
    })
}

fn read_f32(st: &SafeTensors<'_>, name: &str, len: Option<usize>) -> Result<Vec<f32>, Error> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::MissingTensor(name.to_string()))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::Dtype {
            name: name.into(),
            expected: "F32".into(),
            found: format!("{:?}", t.dtype()),
        });
    }
    if t.shape().len() != 1 || len.is_some_and(|n| t.shape()[0] != n) {
        return Err(Error::Shape {
            name: name.into(),
            expected: vec![len.unwrap_or(t.shape().iter().product())],
            found: t.shape().to_vec(),
        });
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn run(args: &Args) -> Result<usize, Error> {
    let bytes = std::fs::read(&args.input).map_err(|source| Error::Io {
        path: args.input.display().to_string(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::SafeTensors {
        context: args.input.display().to_string(),
        source: e,
    })?;
    let mut p = read_f32(&st, "p0", None)?;
    let n = p.len();
    let mut steps = 0;
    while st.tensor(&format!("grad{steps}")).is_ok() {
        steps += 1;
    }
    if steps == 0 {
        return Err(Error::MissingTensor("grad0".into()));
    }
    let mut opt = Adam::new(args.config.clone())?;
    let id = opt.add_param(0, n)?;
    let mut out: Vec<(String, TensorData)> = Vec::with_capacity(steps + 7);
    for k in 0..steps {
        let g = read_f32(&st, &format!("grad{k}"), Some(n))?;
        opt.step(&mut [ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(&g),
        }])?;
        out.push((format!("param{k}"), TensorData::f32(vec![n], &p)));
    }
    let state = opt
        .state(id)?
        .ok_or(Error::UnknownParam { group: 0, index: 0 })?;
    out.extend(state.to_tensors("")?);
    let bytes =
        safetensors::serialize(out.iter().map(|(k, v)| (k.as_str(), v)), None).map_err(|e| {
            Error::SafeTensors {
                context: args.output.display().to_string(),
                source: e,
            }
        })?;
    write_atomically(&args.output, &bytes)?;
    Ok(steps)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("adamw_replay: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args) {
        Ok(steps) => {
            println!(
                "adamw_replay: {steps} steps written to {}",
                args.output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("adamw_replay: {e}");
            ExitCode::FAILURE
        }
    }
}
