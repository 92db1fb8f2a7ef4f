//! The executable form of a lowered entry function: the kernels it launches, in order, over
//! buffers laid out by a liveness-based plan, with launch shapes as functions of the symbolic
//! dims. This is what crosses from the compiler to the runtime (serialized in the package
//! manifest next to the kernels' PTX/cubins).

use crate::kernel::SizeExpr;
use kiln_ir::DType;
use serde::{Deserialize, Serialize};

/// Index of a buffer in [`Plan::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufferId(pub u32);

/// Where a buffer's contents come from and go to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// The function's `n`th input, written by the caller.
    Input(usize),
    /// The function's `n`th result, read by the caller.
    Output(usize),
    /// A checkpoint tensor, bound once at load time.
    Weight(String),
    /// A small tensor the compiler computed (it depends on no input or weight: RoPE's
    /// inverse frequencies), as the little-endian bytes of its elements; written once when
    /// the plan is loaded, never by a kernel.
    Constant(Vec<u8>),
    /// An intermediate, placed in the arena at `offset` bytes (see [`Plan::arena_bytes`]).
    Temp,
    /// Counters (`I32`) that are zero before every launch that uses them: an executor zeroes
    /// the buffer when it allocates it and keeps it between runs (never in the arena);
    /// every kernel that changes an element sets it back to zero before the launch ends
    /// (paged attention's partition counters: the last block of a (token, head group)
    /// merges, then resets its counter).
    Zeroed,
    /// The same memory as another buffer (a reshape of a contiguous tensor).
    View(BufferId),
}

/// A tensor in device memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferDecl {
    pub id: BufferId,
    pub dtype: DType,
    pub shape: Vec<SizeExpr>,
    pub kind: BufferKind,
    /// Byte offset in the arena, for `Temp` buffers: a function of the symbolic dims.
    pub offset: Option<SizeExpr>,
}

/// A kernel argument, in the order of the kernel's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arg {
    Buffer(BufferId),
    /// The value of a symbolic dim (passed as i64).
    Sym(String),
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Launch kernel `kernel` (index into the package's kernels) with `args`.
    Launch { kernel: usize, args: Vec<Arg> },
    /// Copy `bytes` (a size expression) from one buffer to another.
    Copy { src: BufferId, dst: BufferId },
    /// Run `body` `count` times (`count` is an integer scalar buffer read on the host);
    /// before the first iteration copy each `init` into its `carried` buffer, after each
    /// iteration copy each `next` into its `carried` buffer; the final carried buffers are
    /// the loop's results.
    Loop {
        count: BufferId,
        carried: Vec<BufferId>,
        init: Vec<BufferId>,
        next: Vec<BufferId>,
        /// The loop counter, an i64 scalar buffer the body may read.
        counter: BufferId,
        body: Vec<Step>,
    },
    /// Runs `small` when symbol `symbol` is at most `at_most`, else `large`: the same
    /// computation with kernels specialized for few rows (decode-sized GEMMs).
    BySize {
        symbol: String,
        at_most: u64,
        small: Vec<Step>,
        large: Vec<Step>,
    },
}

impl Step {
    /// For a [`Step::BySize`]: the branch that runs, given the symbols' values; an error
    /// names a symbol that has none. `None` for other steps.
    pub fn by_size_branch(
        &self,
        value_of: impl Fn(&str) -> Option<u64>,
    ) -> Option<Result<&[Step], String>> {
        let Step::BySize {
            symbol,
            at_most,
            small,
            large,
        } = self
        else {
            return None;
        };
        Some(match value_of(symbol) {
            Some(v) if v <= *at_most => Ok(small),
            Some(_) => Ok(large),
            None => Err(format!("a branch reads the unbound symbol `{symbol}`")),
        })
    }
}

/// How a symbolic dim gets its value: from dimension `axis` of input `input`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SymBinding {
    pub name: String,
    pub input: usize,
    pub axis: usize,
}

/// The plan of one entry function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub function: String,
    pub symbols: Vec<SymBinding>,
    pub buffers: Vec<BufferDecl>,
    pub inputs: Vec<BufferId>,
    pub outputs: Vec<BufferId>,
    pub steps: Vec<Step>,
    /// Bytes of the arena holding every `Temp` buffer.
    pub arena_bytes: SizeExpr,
    /// The largest value any symbol may take, when the kernels were compiled assuming one
    /// (their index arithmetic may be 32-bit): executors refuse larger values instead of
    /// computing wrong addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol_bound: Option<u64>,
}

impl Plan {
    /// Checks `value` of symbol `name` against [`Plan::symbol_bound`]; the error says why.
    pub fn check_symbol(&self, name: &str, value: u64) -> Result<(), String> {
        match self.symbol_bound {
            Some(bound) if value > bound => Err(format!(
                "symbol `{name}` is {value}, more than {bound}, the largest value the kernels \
                 of `{}` were compiled for (their index arithmetic assumes it); compile with a \
                 larger symbol bound",
                self.function
            )),
            _ => Ok(()),
        }
    }
}
