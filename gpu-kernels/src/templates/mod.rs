//! The kernel templates: each turns one [`Group`] of the partition into a kir kernel,
//! specialised on its dtypes, constant sizes and contiguity. The element-wise work inside
//! every template (prologues, epilogues) comes from the shared [`Emitter`].

mod attention;
mod flash_attention;
mod gemv;
mod gemv_kv;
mod kv_cache;
mod matmul;
mod mma_gemm;
mod mma_gemv;
mod mma_softmax;
mod mma_warp_tiles;
mod norm_gemv;
mod paged_decode;
pub(crate) mod persistent_loop;
mod pointwise;
mod reduce;
mod small_sort;
mod wgmma_gemm;

pub use gemv::GEMV_ROWS;
pub use matmul::MatmulTiling;
pub use mma_gemm::{choose_splits, choose_tile, MmaTile, SMALL_ROWS};
pub use mma_gemv::MMA_GEMV_ROWS;
pub(crate) use norm_gemv::NormPrologues;

use crate::emit::{Emitter, ParamArg, SplitSum};
use crate::error::{EmitError, FusionError};
use crate::graph::FuncGraph;
use crate::partition::{Group, GroupKind, Partition};
use kiln_ir::{DType, Dim, Value};
use kiln_kir::{Kernel, SizeExpr, Stmt, Ty};
use std::collections::{BTreeMap, BTreeSet};

/// A kernel as a template produced it, before it gets its final name.
pub(crate) struct Built {
    pub kernel: Kernel,
    pub args: Vec<ParamArg>,
    /// Graph values whose ops it computes.
    pub fused: BTreeSet<Value>,
    /// A short description for the name (`rms_norm`, `matmul_x3`).
    pub what: String,
}

/// What a template hands back: a description, the launch shape and the body.
pub(crate) struct Body {
    pub what: String,
    pub block_dim: u32,
    pub grid: [SizeExpr; 3],
    pub stmts: Vec<Stmt>,
}

impl Body {
    /// A kernel of `threads`-thread blocks in a one-dimensional grid with a thread for each
    /// element of `dims`.
    pub(crate) fn over(what: String, threads: u32, dims: &[Dim], stmts: Vec<Stmt>) -> Body {
        Body {
            what,
            block_dim: threads,
            grid: [
                ceil_div_size(size_of_dims(dims), u64::from(threads)),
                one(),
                one(),
            ],
            stmts,
        }
    }
}

/// Which variant of a group with run-time size variants ([`SizeVariant`]) is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// The only one of a group without variants, or the large one.
    Large,
    /// The small one (decode-sized GEMMs, short-context paged attention).
    Small,
    /// The GEMV of a GEMM with a symbolic row count, for at most [`GEMV_ROWS`] rows.
    Gemv,
    /// The GEMV of a GEMM with a symbolic row count for one row (decode at batch 1): the
    /// lanes hold one row's accumulators and activations, with no branch on the row count
    /// inside the loop over K, so each step's loads issue together.
    GemvOne,
}

impl Variant {
    /// Whether the templates other than the GEMV build their small variant.
    pub(crate) fn small(self) -> bool {
        self != Variant::Large
    }

    /// The rows a GEMV of a symbolic row count holds in this variant (none: not a GEMV
    /// variant).
    pub(crate) fn gemv_rows(self) -> Option<u64> {
        match self {
            Variant::Gemv => Some(GEMV_ROWS),
            Variant::GemvOne => Some(1),
            Variant::Small | Variant::Large => None,
        }
    }
}

/// Scratch memory the kernels of one group share, an arena temp of the plan.
pub(crate) struct Workspace {
    pub dtype: DType,
    pub shape: Vec<SizeExpr>,
}

/// The launches of one group, in order, and the workspaces they share
/// ([`crate::emit::ParamArg::Workspace`] indexes `workspaces`).
pub(crate) struct Launches {
    pub kernels: Vec<Built>,
    pub workspaces: Vec<Workspace>,
    /// Whether a later group's kernel reads workspace 0 too (a split-K GEMM whose sum a
    /// row-reduction kernel adds, [`RowSums`]).
    pub shared_workspace: bool,
}

/// Split-K GEMM groups whose sum kernel a row-reduction group replaces: when the values
/// a split GEMM group stores (its epilogue's, e.g. a residual add `h`) are first read by a
/// row group over rows of their shape (an RMSNorm of `h`), the row kernel adds the partial
/// sums itself in split order, applies the same epilogue, stores those values (bit for bit
/// what the sum kernel would store: later kernels read `h` as the residual) and reduces
/// them; the GEMM group launches only its partial-sum kernel. Decided per group, the same
/// for both variants of a [`SizeVariant`]; whether it applies to one variant depends on
/// whether that variant's GEMM splits ([`split_plan`]).
#[derive(Default)]
pub(crate) struct RowSums {
    /// Row group → the GEMM groups whose sums it adds.
    pub by_row: BTreeMap<usize, Vec<usize>>,
    /// GEMM group → the row group that adds its sums.
    pub by_gemm: BTreeMap<usize, usize>,
    /// Row groups whose rows the GEMVs reading them compute instead (the same pairing of
    /// a row group with GEMMs, the row group taking their variants: [`NormPrologues`]).
    pub prologues: NormPrologues,
}

impl RowSums {
    /// Finds the pairs (none unless tensor cores and [`crate::GemmTuning::row_sums`] are on);
    /// the norm prologues are found once the `kv_write`s are ([`NormPrologues::find`]).
    pub(crate) fn find(
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        options: &crate::Options,
    ) -> RowSums {
        let mut sums = RowSums::default();
        if options.tensor_cores && options.gemm.row_sums {
            sums.find_sums(g, part, options);
        }
        sums
    }

    /// The split-K GEMMs whose sums a row group adds.
    fn find_sums(&mut self, g: &FuncGraph<'_>, part: &Partition<'_>, options: &crate::Options) {
        let sums = self;
        let reads = reads_by_group(g, part);
        for (mg, group) in part.groups.iter().enumerate() {
            if !matches!(group.kind, GroupKind::Matmul { .. }) {
                continue;
            }
            let Some(row) = row_reader(g, part, &reads, mg) else {
                continue;
            };
            let splits = [Variant::Small, Variant::Large]
                .into_iter()
                .any(|small| split_plan(g, part, mg, options, small, false).is_some());
            let wide = index_type(g, &part.groups[row], options) == Ty::I64
                || index_type(g, group, options) == Ty::I32;
            // A row group's kernels are chosen by one size (that of the GEMMs it reads).
            let variant = |gid: usize| {
                size_variant(
                    g,
                    part,
                    gid,
                    options,
                    &RowSums::default(),
                    &KvWrites::default(),
                )
                .map(|v| (v.symbol, v.at_most, v.gemv))
            };
            let agrees = sums
                .by_row
                .get(&row)
                .and_then(|gemms| gemms.first())
                .is_none_or(|&first| variant(first) == variant(mg));
            if splits && wide && agrees {
                sums.by_row.entry(row).or_default().push(mg);
                sums.by_gemm.insert(mg, row);
            }
        }
    }
}

/// `kv_write` groups whose writes a split-K GEMM's sum kernel performs: when the values of
/// some segments of a split-K grid of segments (decode q/k/v: k and v) are read by nothing
/// but one `kv_write` group (a layer's key and value writes), each write's rows computed
/// from one such segment's values and everything else the writes read ready before the
/// GEMM runs, the sum kernel's threads of those segments store the rows into the caches at
/// their slots instead (the `kv_write`'s own addressing, its rows computed from the
/// partial sums as the `kv_write` kernel would compute them from the stored values: each
/// value the segment stores is added in split order, stored and read back, so the cache
/// gets the same bits), and the `kv_write` group launches nothing. Decided per group pair;
/// in each variant of a [`SizeVariant`] it applies when that variant's GEMM is a split
/// grid of segments ([`split_plan`]), the `kv_write` group taking the GEMM's variants.
#[derive(Default)]
pub(crate) struct KvWrites {
    /// `kv_write` group → the GEMM group whose sum kernel writes its rows.
    pub by_kv: BTreeMap<usize, usize>,
    /// GEMM group → what its sum kernel writes.
    pub by_gemm: BTreeMap<usize, KvFused>,
}

/// The `kv_write`s a GEMM group's sum kernel performs.
pub(crate) struct KvFused {
    /// The `kv_write` group.
    pub kv: usize,
    /// Per write, the segment (matmul index) whose values its rows read.
    pub writes: Vec<(usize, Value)>,
    /// What the sum kernel computes of the rows itself: the `kv_write` group's values and
    /// the f32 values a pointwise kernel after the GEMM stores (RoPE's angles of the first
    /// layer, stored before their first reader), computed inline to the same bits.
    pub owned: BTreeSet<Value>,
    /// Whether a split-K sum kernel may perform the writes ([`crate::GemmTuning::kv_writes`]).
    pub split: bool,
    /// When the GEMV may perform them ([`crate::GemmTuning::gemv_kv_writes`]), per write
    /// whether its rows read a column's rotary partner (`gemv_kv`).
    pub gemv: Option<Vec<bool>>,
}

impl KvWrites {
    /// Finds the pairs (none unless tensor cores and [`crate::GemmTuning::kv_writes`] or,
    /// for the GEMV, [`crate::GemmTuning::gemv_kv_writes`] are on; never for a GEMM whose
    /// sums a row group adds). `constants`: the values the plan holds as constants
    /// (`kiln_opt::small_constants`), ready before any kernel runs.
    pub(crate) fn find(
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        options: &crate::Options,
        rows: &RowSums,
        constants: &BTreeSet<Value>,
    ) -> KvWrites {
        let mut found = KvWrites::default();
        if !options.tensor_cores || !(options.gemm.kv_writes || options.gemm.gemv_kv_writes) {
            return found;
        }
        let reads = reads_by_group(g, part);
        for (kg, group) in part.groups.iter().enumerate() {
            if !matches!(group.kind, GroupKind::KvWrite) {
                continue;
            }
            let Some((mg, mut fused)) = kv_gemm(g, part, &reads, constants, kg) else {
                continue;
            };
            let splits = [Variant::Small, Variant::Large]
                .into_iter()
                .any(|small| split_plan(g, part, mg, options, small, true).is_some());
            fused.split = options.gemm.kv_writes && splits;
            let gemv = [Variant::Gemv, Variant::Small, Variant::Large]
                .into_iter()
                .any(|variant| segmented_gemv(g, part, mg, options, variant));
            if options.gemm.gemv_kv_writes && gemv {
                fused.gemv = gemv_kv::pairs(g, part, mg, &fused, &stored_values(part, mg));
            }
            if (fused.split || fused.gemv.is_some()) && !rows.by_gemm.contains_key(&mg) {
                found.by_kv.insert(kg, mg);
                found.by_gemm.insert(mg, fused);
            }
        }
        found
    }
}

/// The base buffer value of `v` (through the reshapes that share a buffer).
fn base_of(part: &Partition<'_>, mut v: Value) -> Value {
    while let Some(&b) = part.view_of.get(&v) {
        v = b;
    }
    v
}

/// The GEMM group whose sum kernel may perform `kv_write` group `kg`'s writes, with each
/// write's segment ([`KvWrites`]): the one group of matmuls whose stored values `kg` reads,
/// earlier in the same region; every stored value `kg` reads belongs to a segment (one
/// matmul's values) that only `kg` reads (no other group, no function result, no loop), each
/// write's rows `[M, heads, dim]` read exactly one such segment of `heads × dim` columns and
/// the GEMM's `[M, N]` rows; everything else `kg` reads (slots, the caches, RoPE's angles)
/// was stored before the GEMM runs (or is a plan constant) or is an f32 output of a pointwise kernel that reads
/// only such values (then computed inline), and no kernel between the two touches the
/// caches.
fn kv_gemm(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    reads: &[BTreeSet<Value>],
    constants: &BTreeSet<Value>,
    kg: usize,
) -> Option<(usize, KvFused)> {
    let kv = &part.groups[kg];
    let owner = |v: Value| part.owner[base_of(part, v).0 as usize];
    let mut gemms = reads[kg]
        .iter()
        .filter_map(|&v| owner(v))
        .filter(|&o| matches!(part.groups[o].kind, GroupKind::Matmul { .. }));
    let mg = gemms.next()?;
    if gemms.any(|o| o != mg) {
        return None;
    }
    let gemm = &part.groups[mg];
    if gemm.region != kv.region || gemm.pos >= kv.pos {
        return None;
    }
    let out_shape = g.shape(*gemm.roots.first()?);
    let [rows_dim, _] = out_shape else {
        return None;
    };
    let stores = stored_values(part, mg);
    let results: BTreeSet<Value> = g.func.results().iter().map(|&r| base_of(part, r)).collect();
    // Everything else read was stored before the GEMM runs, or is computed inline.
    // (A group storing only plan constants launches nothing: its values are there first.)
    let constant = |o: usize| {
        stored_values(part, o)
            .iter()
            .all(|v| constants.contains(v) && g.shape(*v).iter().all(|d| d.as_const().is_some()))
    };
    let before = |v: &Value| owner(*v).is_none_or(|o| part.groups[o].pos < gemm.pos || constant(o));
    let mut owned = kv.owned.clone();
    for &v in &reads[kg] {
        let b = base_of(part, v);
        if stores.contains(&b) || before(&b) {
            continue;
        }
        let o = owner(b)?;
        let pointwise = &part.groups[o];
        let inline = matches!(pointwise.kind, GroupKind::Pointwise { .. })
            && b == v
            && g.ty(v).dtype == DType::F32
            && reads[o].iter().all(before);
        if !inline {
            return None;
        }
        owned.extend(pointwise.owned.iter().copied());
    }
    // The caches: untouched by the kernels between the GEMM and the writes.
    let caches: BTreeSet<Value> = kv.roots.iter().map(|&w| base_of(part, w)).collect();
    for (gid, other) in part.groups.iter().enumerate() {
        if other.pos <= gemm.pos || other.pos >= kv.pos {
            continue;
        }
        let touches = matches!(other.kind, GroupKind::KvWrite)
            || reads[gid]
                .iter()
                .any(|&v| caches.contains(&base_of(part, v)));
        if touches {
            return None;
        }
    }
    // The segment of each stored value (the matmuls it is computed from).
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = gemm.owned.clone();
    let segment_of = |v: Value| {
        let set = mma_gemm::matmuls_of(&e, gemm, v);
        (set.len() == 1).then(|| *set.iter().next().expect("one matmul"))
    };
    let mut taken: BTreeSet<usize> = BTreeSet::new();
    let mut writes = Vec::new();
    for &w in &kv.roots {
        let inst = g.inst(w)?;
        let rows = inst.operands[1];
        let mut only = Group {
            owned: BTreeSet::from([rows]),
            ..kv.clone()
        };
        only.roots = vec![rows];
        let read: BTreeSet<Value> = buffers_read(g, part, &only)
            .into_iter()
            .map(|v| base_of(part, v))
            .filter(|v| stores.contains(v))
            .collect();
        let segments: BTreeSet<usize> =
            read.iter().map(|&v| segment_of(v)).collect::<Option<_>>()?;
        let [seg] = segments.into_iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        let n = g.shape(gemm.roots[seg]).get(1)?.as_const()?;
        let fits = match g.shape(rows) {
            [m, Dim::Const(heads), Dim::Const(dim)] => m == rows_dim && heads * dim == n,
            _ => false,
        };
        if !fits || !taken.insert(seg) {
            return None;
        }
        writes.push((seg, w));
    }
    let fused = KvFused {
        kv: kg,
        writes,
        owned,
        split: false,
        gemv: None,
    };
    // Every stored value of those segments is read by these writes only.
    for &s in &stores {
        let seg = mma_gemm::matmuls_of(&e, gemm, s);
        if !seg.iter().any(|i| taken.contains(i)) {
            continue;
        }
        if seg.len() != 1 || results.contains(&s) {
            return None;
        }
        let elsewhere = reads
            .iter()
            .enumerate()
            .any(|(gid, r)| gid != kg && gid != mg && r.iter().any(|&v| base_of(part, v) == s));
        if elsewhere {
            return None;
        }
        let mut stack = vec![s];
        while let Some(v) = stack.pop() {
            for (region, inst) in &g.users[v.0 as usize] {
                if *region != gemm.region || matches!(inst.op, kiln_ir::Op::Loop) {
                    return None;
                }
                stack.extend(inst.results.iter().filter(|r| part.view_of.contains_key(r)));
            }
        }
    }
    Some((mg, fused))
}

/// The values group `gid` stores (writes to buffers that other kernels read).
fn stored_values(part: &Partition<'_>, gid: usize) -> Vec<Value> {
    let group = &part.groups[gid];
    group
        .roots
        .iter()
        .chain(&group.outputs)
        .copied()
        .filter(|v| part.stored[v.0 as usize])
        .collect()
}

/// The row group that may add GEMM group `mg`'s split-K sums: the first kernel (in run
/// order) to read any value `mg` stores, when it is a row group of the same region over
/// rows of exactly the shape of every such value, every other reader runs after it, and no
/// loop reads them. `reads[gid]`: the values whose buffers group `gid` reads.
fn row_reader(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    reads: &[BTreeSet<Value>],
    mg: usize,
) -> Option<usize> {
    let gemm = &part.groups[mg];
    let stores = stored_values(part, mg);
    if stores.is_empty() {
        return None;
    }
    let base = |mut v: Value| {
        while let Some(&b) = part.view_of.get(&v) {
            v = b;
        }
        v
    };
    for &s in &stores {
        // Every use of a stored value (or of a view of it) is by an op of this region.
        let mut stack = vec![s];
        while let Some(v) = stack.pop() {
            for (region, inst) in &g.users[v.0 as usize] {
                if *region != gemm.region || matches!(inst.op, kiln_ir::Op::Loop) {
                    return None;
                }
                stack.extend(inst.results.iter().filter(|r| part.view_of.contains_key(r)));
            }
        }
    }
    let first = part
        .groups
        .iter()
        .enumerate()
        .filter(|(gid, _)| *gid != mg && reads[*gid].iter().any(|v| stores.contains(&base(*v))))
        .min_by_key(|(_, group)| group.pos)?;
    let (row, group) = first;
    let GroupKind::Row { outer, inner } = &group.kind else {
        return None;
    };
    let full: Vec<Dim> = outer.iter().chain(inner).cloned().collect();
    let fits = group.region == gemm.region
        && group.pos > gemm.pos
        && stores
            .iter()
            .chain(&gemm.roots)
            .all(|v| g.shape(*v) == full.as_slice());
    fits.then_some(row)
}

/// [`buffers_read`] of every group of `part`, by group index.
fn reads_by_group(g: &FuncGraph<'_>, part: &Partition<'_>) -> Vec<BTreeSet<Value>> {
    part.groups
        .iter()
        .map(|group| buffers_read(g, part, group))
        .collect()
}

/// The values whose buffers a group's kernel reads: walking down from what it computes
/// through the element-wise values it inlines, as the emitter does.
fn buffers_read(g: &FuncGraph<'_>, part: &Partition<'_>, group: &Group) -> BTreeSet<Value> {
    let mut read = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Value> = group.owned.iter().copied().collect();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        let computed = group.owned.contains(&v)
            || !(g.is_source(v) || g.is_heavy(v) || part.stored[v.0 as usize]);
        if !computed {
            read.insert(v);
            continue;
        }
        if let Some(inst) = g.inst(v) {
            stack.extend(inst.operands.iter().copied());
        }
    }
    read
}

/// The tensor-core plan of GEMM group `mg` in variant `small` when it splits K across
/// blocks and is (`segmented`) or is not a grid of segments: a grid of segments' sum kernel
/// may perform `kv_write`s ([`KvWrites`]), a single grid's sums a row group may add
/// ([`RowSums`]). None where the GEMV or the tensor-core GEMV takes the group in that
/// variant (neither splits).
fn split_plan(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    mg: usize,
    options: &crate::Options,
    variant: Variant,
    segmented: bool,
) -> Option<mma_gemm::MmaPlan> {
    let group = &part.groups[mg];
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = group.owned.clone();
    if gemv::plan(&e, group, variant, options).is_some()
        || mma_gemv::plan(&e, group, variant, options).is_some()
    {
        return None;
    }
    mma_gemm::plan(&e, group, variant.small(), options)
        .filter(|p| options.tensor_cores && p.split().is_some() && p.segmented() == segmented)
}

/// Whether GEMM group `mg` takes the GEMV in `variant` as a grid of segments (whose
/// segments may perform `kv_write`s, [`KvWrites`]).
fn segmented_gemv(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    mg: usize,
    options: &crate::Options,
    variant: Variant,
) -> bool {
    let group = &part.groups[mg];
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = group.owned.clone();
    gemv::plan(&e, group, variant, options).is_some_and(|p| p.segmented())
}

/// A group whose kernels come in two variants, chosen at run time by a symbol's value
/// (`Step::BySize`): [`build`] with [`Variant::Small`] for values of at most `at_most`;
/// with `gemv`, a third one, [`Variant::Gemv`], for values of at most [`GEMV_ROWS`].
pub(crate) struct SizeVariant {
    pub symbol: String,
    pub at_most: u64,
    pub gemv: bool,
}

/// The size variant of group `gid`, if it has one:
/// - a tensor-core GEMM whose row count is one symbolic dim (a `[T, N]` result) has a
///   decode-sized variant for at most [`mma_gemm::SMALL_ROWS`] rows, and the GEMV for at
///   most [`GEMV_ROWS`] where it applies ([`crate::GemmTuning::gemv`]); a plain one whose row
///   count is symbolic has its small tile up to the row count where the large tile would
///   have enough blocks ([`matmul::large_tile_rows`]);
/// - a row group that adds split-K GEMM sums ([`RowSums`]) has the GEMMs' variants, a
///   `kv_write` group whose writes a GEMM's sum kernel may perform ([`KvWrites`]) the
///   GEMM's;
/// - paged decode attention whose block tables have a symbolic width has a variant for
///   block tables of at most [`crate::PagedTuning::short_context`] key positions: one pass
///   over each table ([`crate::PagedTuning::one_pass`]), or short partitions
///   ([`crate::PagedTuning::short_part`]) so that short contexts still make enough blocks
///   to fill the GPU.
pub(crate) fn size_variant(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    gid: usize,
    options: &crate::Options,
    rows: &RowSums,
    kv: &KvWrites,
) -> Option<SizeVariant> {
    let group = &part.groups[gid];
    if let Some(&mg) = rows.by_row.get(&gid).and_then(|gemms| gemms.first()) {
        // A row group adding split-K sums has the variants of the GEMMs it reads.
        return size_variant(g, part, mg, options, rows, kv);
    }
    if let Some(&mg) = kv.by_kv.get(&gid) {
        // So has a `kv_write` group whose writes a GEMM's sum kernel may perform.
        return size_variant(g, part, mg, options, rows, kv);
    }
    if let Some(&mg) = rows
        .prologues
        .by_row
        .get(&gid)
        .and_then(|gemms| gemms.first())
    {
        // And a row group whose rows the GEMVs reading them compute ([`NormPrologues`]).
        return size_variant(g, part, mg, options, rows, kv);
    }
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = group.owned.clone();
    match &group.kind {
        GroupKind::Matmul { .. } => {
            let shape = g.shape(*group.roots.first()?);
            if options.tensor_cores {
                if let [Dim::Sym(rows), _] = shape {
                    if mma_gemm::plan(&e, group, true, options).is_some() {
                        return Some(SizeVariant {
                            symbol: rows.clone(),
                            at_most: SMALL_ROWS,
                            gemv: gemv::plan(&e, group, Variant::Gemv, options).is_some(),
                        });
                    }
                }
                if mma_gemm::plan(&e, group, false, options).is_some() {
                    return None;
                }
            }
            if options.matmul_tiling.is_some() {
                return None;
            }
            matmul::large_tile_rows(g, group).map(|(symbol, at_most)| SizeVariant {
                symbol,
                at_most,
                gemv: false,
            })
        }
        GroupKind::PagedAttention(out) => {
            let tuning = &options.paged;
            paged_decode::PagedShape::of(&e, *out, tuning)?;
            let inst = g.inst(*out)?;
            let Dim::Sym(width) = g.shape(inst.operands[3]).get(1)? else {
                return None;
            };
            let block_tokens = g.shape(inst.operands[1]).get(2)?.as_const()?.max(1);
            let at_most = tuning.short_context / block_tokens;
            (tuning.short_part < tuning.part && at_most > 0).then(|| SizeVariant {
                symbol: width.clone(),
                at_most,
                gemv: false,
            })
        }
        _ => None,
    }
}

/// Builds the kernels of group `gid` (one, or a split-K GEMM and its reduction); `None`
/// when it stores nothing anyone reads. `variant`: which variant of a group that has them
/// ([`size_variant`]).
pub(crate) fn build(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    gid: usize,
    options: &crate::Options,
    variant: Variant,
    rows: &RowSums,
    kv: &KvWrites,
) -> Result<Option<Launches>, FusionError> {
    let group = &part.groups[gid];
    if let Some(&mg) = kv.by_kv.get(&gid) {
        let fused = &kv.by_gemm[&mg];
        let by_sum = fused.split && split_plan(g, part, mg, options, variant, true).is_some();
        let by_gemv = fused.gemv.is_some() && segmented_gemv(g, part, mg, options, variant);
        if by_sum || by_gemv {
            // The GEMM's sum kernel or GEMV stores the rows ([`KvWrites`]).
            return Ok(None);
        }
    }
    if rows.prologues.absorbed(g, part, gid, options, variant) {
        // The GEMVs reading its rows compute them ([`NormPrologues`]).
        return Ok(None);
    }
    let stores: Vec<Value> = group
        .roots
        .iter()
        .chain(&group.outputs)
        .copied()
        .filter(|v| part.stored[v.0 as usize])
        .collect();
    if stores.is_empty() {
        return Ok(None);
    }
    let index_ty = index_type(g, group, options);
    let new_emitter = || {
        let mut e = Emitter::new(g, &part.stored, index_ty);
        e.owned = group.owned.clone();
        e
    };
    let mut e = new_emitter();
    if let GroupKind::Matmul { .. } = &group.kind {
        if let Some(plan) = gemv::plan(&e, group, variant, options) {
            // At most four rows: a warp a column, no split-K; A perhaps a norm's rows it
            // computes itself; the `kv_write`s its segments perform ([`KvWrites`]), in the
            // wider index type of the two groups.
            let norm = rows.prologues.of_gemm(g, part, gid, options, variant);
            let mut plan = plan.with_norm(norm);
            let fused = kv.by_gemm.get(&gid).filter(|f| f.gemv.is_some());
            if let Some(fused) = fused.filter(|_| plan.segmented()) {
                if index_type(g, &part.groups[fused.kv], options) == Ty::I64 {
                    e.index_ty = Ty::I64;
                }
                plan.write_kv(gemv_kv::GemvWrites::of(g, fused, group.roots.len()));
            }
            let body = gemv::emit(&mut e, group, &stores, &plan);
            let built = finish(g, e, body, out_dtype(g, &stores))?;
            return Ok(Some(Launches {
                kernels: vec![built],
                workspaces: Vec::new(),
                shared_workspace: false,
            }));
        }
        if let Some(plan) = mma_gemv::plan(&e, group, variant, options) {
            // At most 16 rows: tensor-core products on weights straight from memory.
            let body = mma_gemv::emit(&mut e, group, &stores, &plan);
            let built = finish(g, e, body, out_dtype(g, &stores))?;
            return Ok(Some(Launches {
                kernels: vec![built],
                workspaces: Vec::new(),
                shared_workspace: false,
            }));
        }
    }
    let small = variant.small();
    let mma = match &group.kind {
        GroupKind::Matmul { .. } => {
            mma_gemm::plan(&e, group, small, options).filter(|_| options.tensor_cores)
        }
        _ => None,
    };
    if let Some(plan) = mma.as_ref().filter(|p| p.split().is_some()) {
        // Split-K across blocks: f32 partial sums of each K slice into a workspace, then
        // one kernel adds them in a fixed order and applies the epilogue.
        let workspace = mma_gemm::split_workspace(g, group, plan);
        let body = mma_gemm::emit(&mut e, group, &[], plan);
        let partial = finish(g, e, body, DType::F32)?;
        let into_rows = rows.by_gemm.contains_key(&gid)
            && split_plan(g, part, gid, options, variant, false).is_some();
        if into_rows {
            // A row-reduction kernel adds the sums (`RowSums`), by the same test.
            return Ok(Some(Launches {
                kernels: vec![partial],
                workspaces: vec![workspace],
                shared_workspace: true,
            }));
        }
        // The `kv_write`s its sum kernel performs ([`KvWrites`]), in the wider index type
        // of the two groups.
        let fused = kv.by_gemm.get(&gid).filter(|f| f.split && plan.segmented());
        let mut e = new_emitter();
        if fused.is_some_and(|f| index_type(g, &part.groups[f.kv], options) == Ty::I64) {
            e.index_ty = Ty::I64;
        }
        let body = mma_gemm::emit_split_sum(&mut e, group, &stores, plan, fused);
        let sum = finish(g, e, body, out_dtype(g, &stores))?;
        return Ok(Some(Launches {
            kernels: vec![partial, sum],
            workspaces: vec![workspace],
            shared_workspace: false,
        }));
    }
    if let GroupKind::PagedAttention(out) = &group.kind {
        let mut tuning = options.paged;
        if small {
            tuning.part = tuning.short_part;
            tuning.warps = tuning.short_warps;
            tuning.unroll = tuning.short_unroll;
            tuning.tile = 0;
            // Short block tables: one pass over each, no merge kernel (the variant serves
            // tables of at most `short_context` positions, a whole one a partition; its
            // own warps, the register design's `unroll`).
            let whole = crate::PagedTuning {
                part: tuning.short_context.max(1),
                tile: 0,
                ..options.paged
            };
            let entries = match g.shape(g.inst(*out).expect("paged_attention").operands[1])[2] {
                Dim::Const(bs) if bs > 0 => tuning.short_context / bs,
                _ => 0,
            };
            if let Some(mut shape) = paged_decode::PagedShape::of(&e, *out, &whole) {
                if shape.one_pass(tuning.one_pass, entries) {
                    let body = paged_decode::emit_partial(&mut e, *out, &shape);
                    let built = finish(g, e, body, out_dtype(g, &stores))?;
                    return Ok(Some(Launches {
                        kernels: vec![built],
                        workspaces: Vec::new(),
                        shared_workspace: false,
                    }));
                }
            }
        }
        if let Some(shape) = paged_decode::PagedShape::of(&e, *out, &tuning) {
            // Split over the sequence: partial softmax per partition, then the merge (by
            // the partial kernel's last block of a token and head group, or a kernel).
            let workspace = paged_decode::workspace(&e, *out, &shape);
            let body = paged_decode::emit_partial(&mut e, *out, &shape);
            let partial = finish(g, e, body, out_dtype(g, &stores))?;
            if shape.merges() {
                return Ok(Some(Launches {
                    kernels: vec![partial],
                    workspaces: vec![workspace],
                    shared_workspace: false,
                }));
            }
            let mut e = new_emitter();
            let body = paged_decode::emit_merge(&mut e, *out, &shape);
            let merge = finish(g, e, body, out_dtype(g, &stores))?;
            return Ok(Some(Launches {
                kernels: vec![partial, merge],
                workspaces: vec![workspace],
                shared_workspace: false,
            }));
        }
    }
    let body = match &group.kind {
        GroupKind::Pointwise { shape } => {
            pointwise::emit(&mut e, shape, &stores, &options.pointwise)
        }
        GroupKind::Row { outer, inner } => {
            // The values of split-K GEMMs whose sums this kernel adds are computed, stored
            // and reduced here.
            let mut stores = stores.clone();
            for &mg in rows.by_row.get(&gid).into_iter().flatten() {
                let Some(plan) = split_plan(g, part, mg, options, variant, false) else {
                    continue;
                };
                let gemm = &part.groups[mg];
                let (splits, _) = plan.split().expect("a split GEMM");
                let workspace = e.group_workspace(mg);
                e.split_sums.push(SplitSum {
                    workspace,
                    matmuls: gemm.roots.clone(),
                    splits,
                    owned: gemm.owned.clone(),
                    segment: None,
                });
                for v in stored_values(part, mg) {
                    e.sourced.insert(v, e.split_sums.len() - 1);
                    stores.push(v);
                }
            }
            reduce::emit_rows(&mut e, group, outer, inner, &stores)
        }
        GroupKind::LoopReduce => reduce::emit_loop(&mut e, group.roots[0]),
        GroupKind::Matmul { .. } => match &mma {
            Some(plan) => match wgmma_gemm::plan(g, plan, options, small) {
                Some(wgmma) => wgmma_gemm::emit(&mut e, group, &stores, &wgmma),
                None => mma_gemm::emit(&mut e, group, &stores, plan),
            },
            None => {
                // A group with a run-time choice builds its small tile for few rows and
                // its large tile for the rest.
                let variant = (options.matmul_tiling.is_none()
                    && matmul::large_tile_rows(g, group).is_some())
                .then_some(if small {
                    MatmulTiling::SMALL
                } else {
                    MatmulTiling::LARGE
                });
                let tiling = options.matmul_tiling.or(variant);
                let load_ty = operand_index_type(g, group, options, index_ty);
                matmul::emit(&mut e, group, &stores, tiling.as_ref(), load_ty)
            }
        },
        GroupKind::Attention(parts) => attention::emit(&mut e, &attention::Source::Pattern(parts)),
        GroupKind::BuiltinAttention(v) => {
            match flash_attention::plan(&e, *v).filter(|_| options.tensor_cores) {
                Some(plan) => flash_attention::emit(&mut e, &plan, &options.attention),
                None => attention::emit(&mut e, &attention::Source::Builtin(*v)),
            }
        }
        GroupKind::PagedAttention(v) => attention::emit(&mut e, &attention::Source::Paged(*v)),
        GroupKind::KvWrite => kv_cache::emit(&mut e, &group.roots),
        GroupKind::SmallSort { axis, len, .. } => {
            small_sort::emit_small(&mut e, group, *axis, *len, &stores)
        }
        GroupKind::SortLoop(v) => small_sort::emit_loop(&mut e, *v),
    };
    let built = finish(g, e, body, out_dtype(g, &stores))?;
    Ok(Some(Launches {
        kernels: vec![built],
        workspaces: Vec::new(),
        shared_workspace: false,
    }))
}

/// The dtype a kernel's name ends with: that of its first stored value.
fn out_dtype(g: &FuncGraph<'_>, stores: &[Value]) -> DType {
    stores.first().map(|v| g.ty(*v).dtype).unwrap_or(DType::F32)
}

/// The kernel of a template's body, named `{what}_{dtype}`.
fn finish(
    g: &FuncGraph<'_>,
    e: Emitter<'_, '_>,
    body: Result<Body, EmitError>,
    dtype: DType,
) -> Result<Built, FusionError> {
    let body = body.map_err(|err| match err {
        EmitError::Fatal(f) => f,
        EmitError::NotFusable(v) => FusionError::Internal {
            function: g.func.name.clone(),
            value: v,
            message: "read at an element its kernel does not hold".into(),
        },
    })?;
    let what = format!("{}_{}", body.what, dtype.name());
    let (kernel, args, fused) = e.finish(String::new(), body.block_dim, body.grid, body.stmts);
    Ok(Built {
        kernel,
        args,
        fused,
        what,
    })
}

/// The index type of a matmul group's operand reads: `I32` when every value they reach
/// (the matmuls' operands and, through the values the kernel computes, their inputs) stays
/// below 2^31 elements, else `index_ty` (x @ x.T of many rows: a large result, small
/// operands).
fn operand_index_type(
    g: &FuncGraph<'_>,
    group: &Group,
    options: &crate::Options,
    index_ty: Ty,
) -> Ty {
    if index_ty == Ty::I32 || options.index_width == crate::IndexWidth::I64 {
        return index_ty;
    }
    let mut stack: Vec<Value> = group
        .roots
        .iter()
        .filter_map(|m| g.inst(*m))
        .flat_map(|inst| inst.operands.iter().copied())
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if group.owned.contains(&v) {
            if let Some(inst) = g.inst(v) {
                stack.extend(inst.operands.iter().copied());
            }
        }
    }
    if below_2_31_elements(g, &seen, options) {
        Ty::I32
    } else {
        index_ty
    }
}

/// Whether every value of `values` has fewer than 2^31 elements with each symbolic dim at
/// most `options.symbol_bound`.
fn below_2_31_elements(
    g: &FuncGraph<'_>,
    values: &BTreeSet<Value>,
    options: &crate::Options,
) -> bool {
    let limit = (1u128 << 31) - 1;
    values.iter().all(|v| {
        let n = g.shape(*v).iter().fold(1u128, |acc, d| {
            acc.saturating_mul(match d {
                Dim::Const(n) => u128::from(*n),
                Dim::Sym(_) => u128::from(options.symbol_bound),
            })
        });
        n <= limit
    })
}

/// I32 index arithmetic when every tensor the kernel touches stays below 2^31 elements
/// with each symbolic dim at most `options.symbol_bound`; I64 otherwise.
fn index_type(g: &FuncGraph<'_>, group: &Group, options: &crate::Options) -> Ty {
    match options.index_width {
        crate::IndexWidth::I32 => return Ty::I32,
        crate::IndexWidth::I64 => return Ty::I64,
        crate::IndexWidth::Auto => {}
    }
    let mut values: BTreeSet<Value> = group.owned.clone();
    for &o in &group.owned {
        if let Some(inst) = g.inst(o) {
            values.extend(inst.operands.iter().copied());
        }
    }
    let fits = below_2_31_elements(g, &values, options);
    // Operands reached through inlined chains are bounded by the same shapes in practice;
    // the widest shapes are the group's own values and their direct operands.
    if fits {
        Ty::I32
    } else {
        Ty::I64
    }
}

pub(crate) fn size_of_dims(dims: &[Dim]) -> SizeExpr {
    let mut acc: Option<SizeExpr> = None;
    for d in dims {
        let e = match d {
            Dim::Const(n) => SizeExpr::Const(*n),
            Dim::Sym(s) => SizeExpr::Sym(s.clone()),
        };
        acc = Some(match acc {
            None => e,
            Some(a) => mul_size(a, e),
        });
    }
    acc.unwrap_or(SizeExpr::Const(1))
}

pub(crate) fn mul_size(a: SizeExpr, b: SizeExpr) -> SizeExpr {
    match (a, b) {
        (SizeExpr::Const(x), SizeExpr::Const(y)) => SizeExpr::Const(x * y),
        (SizeExpr::Const(1), y) => y,
        (x, SizeExpr::Const(1)) => x,
        (x, y) => SizeExpr::Mul(Box::new(x), Box::new(y)),
    }
}

pub(crate) fn ceil_div_size(a: SizeExpr, b: u64) -> SizeExpr {
    match a {
        SizeExpr::Const(x) => SizeExpr::Const(x.div_ceil(b)),
        x if b == 1 => x,
        x => SizeExpr::CeilDiv(Box::new(x), Box::new(SizeExpr::Const(b))),
    }
}

pub(crate) fn one() -> SizeExpr {
    SizeExpr::Const(1)
}
