//! The JIT API: compile `.ein` source once, then call its kernels with tensors or slices.
//!
//! ```
//! use einfuse::{compile, CompileOptions, DType, Tensor};
//!
//! let source = "
//!     kernel attention {
//!       rank E = 4, F = 4, M, P
//!       input Q[E, P], K[E, M], V[F, M]
//!       QK[m, p] = Q[e, p] * K[e, m]
//!       GM[p]    = max[m](QK[m, p])
//!       SN[m, p] = exp(QK[m, p] - GM[p])
//!       SD[p]    = SN[m, p]
//!       AV[f, p] = SN[m, p] / SD[p] * V[f, m]
//!       output AV
//!     }";
//! let compiled = compile(source, &CompileOptions::default()).unwrap();
//! let kernel = compiled.kernel("attention").unwrap();
//! let q = Tensor::random(DType::F32, vec![4, 3], 1).unwrap();   // E = 4, P = 3
//! let k = Tensor::random(DType::F32, vec![4, 10], 2).unwrap();  // M = 10 keys
//! let v = Tensor::random(DType::F32, vec![4, 10], 3).unwrap();
//! let outputs = kernel.call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap();
//! assert_eq!(outputs[0].0, "AV");
//! assert_eq!(outputs[0].1.shape(), &[4, 3]);
//! // A tensor of the wrong shape is an error that names it, not a crash.
//! let wrong = Tensor::random(DType::F32, vec![5, 3], 1).unwrap();
//! let error = kernel.call(&[("Q", &wrong), ("K", &k), ("V", &v)]).unwrap_err();
//! assert!(error.to_string().contains("`Q`"));
//! ```

use std::path::Path;

use std::borrow::Cow;

use crate::compiler::ir::{Cascade, Extent, RankId, TensorId, TensorKind};
use crate::compiler::schedule::layout::is_batch_rank;
use crate::compiler::shapes::{bind_extents, ShapeError};
use crate::{dtype_of, BuildOptions, Built, DType, Error, Program, Target, Tensor};

/// How to compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Where the kernels run. The default, `Target::Cpu` (Cranelift), compiles in milliseconds;
    /// `Target::CpuLlvm` takes longer to compile (LLVM's O3 pipeline) and uses the CPU's full
    /// vector width, for long-running kernels.
    pub target: Target,
    /// Run the e-graph optimizer first (fewest passes).
    pub optimize: bool,
    /// The tile size of split ranks the optimizer creates; by default 64, on the GPU targets as
    /// `optimize_for_gpu` chooses (32 where a head dimension of 128 needs it).
    pub tile: Option<u64>,
    /// Param overrides, baked into the compiled code.
    pub params: Vec<(String, f64)>,
    /// Fail when an output holds an infinity or a NaN.
    pub check_finite: bool,
    /// Threads each call uses (default: every core).
    pub threads: usize,
    /// Compile the split-key (Flash-Decoding) form with chunks of this many keys: a call runs
    /// every chunk at once, then the merge (see `compiler::split`). A kernel that does not split
    /// is an error at compile time.
    pub split_keys: Option<u64>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target: Target::Cpu,
            optimize: true,
            tile: None,
            params: vec![],
            check_finite: true,
            threads: crate::all_cores(),
            split_keys: None,
        }
    }
}

/// The compiled kernels of one source.
pub struct Compiled {
    pub kernels: Vec<Kernel>,
}

/// One compiled kernel; `Send + Sync`, so it may be called from several threads at once.
pub struct Kernel {
    built: Built,
    check_finite: bool,
    threads: usize,
}

/// Compiles every kernel of `source`.
pub fn compile(source: &str, options: &CompileOptions) -> Result<Compiled, Error> {
    compile_program(Program::from_source("<source>", source)?, options)
}

/// Compiles every kernel of `source`, its errors rendered with `path` as the file's name.
pub fn compile_named(path: &str, source: &str, options: &CompileOptions) -> Result<Compiled, Error> {
    compile_program(Program::from_source(path, source)?, options)
}

/// Compiles every kernel of a file.
pub fn compile_file(path: &Path, options: &CompileOptions) -> Result<Compiled, Error> {
    compile_program(Program::from_file(path)?, options)
}

fn compile_program(program: Program, options: &CompileOptions) -> Result<Compiled, Error> {
    let build_options = BuildOptions {
        target: options.target,
        optimize: options.optimize,
        tile: options.tile,
        params: options.params.clone(),
        split_keys: options.split_keys,
    };
    let mut kernels = Vec::new();
    for cascade in &program.kernels {
        kernels.push(Kernel {
            built: crate::pipeline::build(cascade, &build_options)?,
            check_finite: options.check_finite,
            threads: options.threads.max(1),
        });
    }
    Ok(Compiled { kernels })
}

impl Compiled {
    /// The kernel named `name`.
    pub fn kernel(&self, name: &str) -> Result<&Kernel, Error> {
        self.kernels.iter().find(|k| k.name() == name).ok_or_else(|| {
            let names: Vec<&str> = self.kernels.iter().map(Kernel::name).collect();
            Error::Usage(format!("no kernel `{name}` (there are: {})", names.join(", ")))
        })
    }
}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.built.cascade.name
    }

    /// The cascade that runs (after optimization, when asked for).
    pub fn cascade(&self) -> &Cascade {
        &self.built.cascade
    }

    /// How long each stage of the pipeline took for this kernel.
    pub fn timings(&self) -> &crate::Timings {
        &self.built.timings
    }

    /// Calls the kernel with tensors by input name; symbolic ranks are bound from their shapes.
    /// Returns the outputs by name, in declaration order.
    pub fn call(&self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>, Error> {
        let views: Vec<(&str, &[f32], &[usize])> = inputs.iter().map(|(n, t)| (*n, t.data(), t.shape())).collect();
        self.call_slices(&views)
    }

    /// Calls the kernel with borrowed row-major f32 slices and their shapes.
    pub fn call_slices(&self, inputs: &[(&str, &[f32], &[usize])]) -> Result<Vec<(String, Tensor)>, Error> {
        self.call_with(inputs, &CallOptions::default())
    }

    /// The kernel's inputs: names, ranks and storage types, in declaration order.
    pub fn inputs(&self) -> Vec<Port> {
        let c = &self.built.cascade;
        c.inputs().into_iter().map(|id| Port::of(c, id, input_dtype(c, id))).collect()
    }

    /// The kernel's outputs, in declaration order.
    pub fn outputs(&self) -> Vec<Port> {
        let c = &self.built.cascade;
        c.outputs.iter().map(|o| Port::of(c, o.tensor, dtype_of(o.elem))).collect()
    }

    /// `call_slices` with per-call settings. The slices are read in place: f32 inputs are not
    /// copied (inputs of a 16-bit storage type are rounded to it first, a copy).
    pub fn call_with(
        &self,
        inputs: &[(&str, &[f32], &[usize])],
        options: &CallOptions,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let c = &self.built.cascade;
        let ids = c.inputs();
        for (name, _, _) in inputs {
            if !ids.iter().any(|id| c.tensor(*id).name == *name) {
                return Err(ShapeError::UnknownInput { tensor: name.to_string() }.into());
            }
            if inputs.iter().filter(|(n, _, _)| n == name).count() > 1 {
                return Err(Error::Usage(format!("input `{name}` is given twice")));
            }
        }
        let mut ordered: Vec<(&[f32], &[usize])> = Vec::new();
        for id in &ids {
            let name = &c.tensor(*id).name;
            let (_, data, shape) = inputs
                .iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| ShapeError::MissingInput { tensor: name.clone() })?;
            let expected: usize = shape.iter().product();
            if data.len() != expected {
                return Err(Error::Usage(format!(
                    "input `{name}`: the slice holds {} elements but its shape {shape:?} needs {expected}",
                    data.len()
                )));
            }
            ordered.push((data, shape));
        }
        let shapes: Vec<_> =
            ids.iter().zip(&ordered).map(|(id, (_, shape))| (*id, shape.iter().map(|n| *n as u64).collect())).collect();
        let extents = bind_extents(c, &[], &shapes)?;
        let origins = self.origins(&options.offsets)?;
        // Narrow storage types hold only representable values.
        let slices: Vec<Cow<[f32]>> = ids
            .iter()
            .zip(&ordered)
            .map(|(id, (data, _))| match input_dtype(c, *id) {
                DType::F32 => Cow::Borrowed(*data),
                dtype => Cow::Owned(data.iter().map(|x| dtype.round(*x)).collect()),
            })
            .collect();
        let slices: Vec<&[f32]> = slices.iter().map(AsRef::as_ref).collect();
        let values = self.built.run_at(&extents, &slices, self.threads, &origins)?;
        let outputs = crate::output_tensors(c, &extents, values);
        if self.check_finite {
            crate::check_finite(&outputs)?;
        }
        Ok(outputs)
    }

    /// Each rank's global origin from offsets by rank name. Only a batch rank (never reduced, in
    /// every output, read at its own position) may be offset: along it, the call is one piece
    /// of a longer computation.
    fn origins(&self, offsets: &[(String, i64)]) -> Result<Vec<i64>, Error> {
        let c = &self.built.cascade;
        let mut origins = vec![0i64; c.ranks.len()];
        for (name, offset) in offsets {
            let Some(r) = c.ranks.iter().position(|r| r.name == *name) else {
                let names: Vec<&str> = c.ranks.iter().map(|r| r.name.as_str()).collect();
                return Err(Error::Usage(format!(
                    "kernel `{}` has no rank `{name}` to offset (its ranks: {})",
                    c.name,
                    names.join(", ")
                )));
            };
            if !is_batch_rank(c, RankId::new(r)) {
                return Err(Error::Usage(format!(
                    "rank `{name}` of kernel `{}` cannot be offset: only a rank that every output holds and \
                     nothing reduces (a batch rank) can",
                    c.name
                )));
            }
            if offset.unsigned_abs() > MAX_OFFSET {
                return Err(Error::Usage(format!(
                    "the offset of rank `{name}` ({offset}) is beyond the largest allowed, {MAX_OFFSET}"
                )));
            }
            origins[r] = *offset;
        }
        Ok(origins)
    }
}

/// The largest offset of a rank, either way: positions stay exact in f64 and far from overflow.
pub const MAX_OFFSET: u64 = 1 << 48;

/// Settings of one call.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// The global position of the first point of each named rank: the call computes one shard
    /// of a longer sequence, and index values and filters (a causal mask, ALiBi's distances) see
    /// global positions while the arrays hold the shard. Only batch ranks may be offset.
    pub offsets: Vec<(String, i64)>,
}

/// An input or output of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    /// The names of its ranks, in order.
    pub ranks: Vec<String>,
    /// The fixed extent of each rank, `None` where it is symbolic or derived.
    pub extents: Vec<Option<u64>>,
    /// The storage type.
    pub dtype: DType,
}

impl Port {
    fn of(c: &Cascade, id: TensorId, dtype: DType) -> Port {
        let t = c.tensor(id);
        Port {
            name: t.name.clone(),
            ranks: t.ranks.iter().map(|r| c.rank(*r).name.clone()).collect(),
            extents: t
                .ranks
                .iter()
                .map(|r| match c.rank(*r).extent {
                    Extent::Fixed(n) => Some(n),
                    _ => None,
                })
                .collect(),
            dtype,
        }
    }
}

/// The storage type of an input.
fn input_dtype(c: &Cascade, id: TensorId) -> DType {
    match c.tensor(id).kind {
        TensorKind::Input { elem } => dtype_of(elem),
        TensorKind::Defined { .. } => DType::F32,
    }
}
