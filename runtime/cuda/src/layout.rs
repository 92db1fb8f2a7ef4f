//! Where each buffer of a plan lives for given symbol values: the inputs side by side in one
//! allocation (so that a run's inputs are copied in by one copy), except those the plan
//! updates in place (KV caches), which, like the outputs, have allocations of their own;
//! weights in theirs (bound once), temps at their offsets in the one arena, and views at
//! offset 0 of whatever they view. Every placement is checked to lie inside its storage.
//! Plain Rust, testable without a GPU.

use std::collections::BTreeSet;

use kiln_kir::{BufferId, BufferKind, Plan};

use crate::binding::{buffer_bytes, buffer_decl, eval_size, SymbolValues};
use crate::error::CudaError;
use crate::validate::view_root;

/// The device allocation a buffer lives in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Storage {
    /// The own allocation of an `Output` buffer, an input the plan updates in place, a
    /// constant or zeroed buffer.
    Own(BufferId),
    /// The allocation of the inputs the plan does not update in place ([`input_block`]).
    Inputs,
    /// The allocation of a bound weight, by checkpoint name.
    Weight(String),
    /// The arena of `Temp` buffers.
    Arena,
}

/// A buffer's bytes: `bytes` bytes at `offset` of `storage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub storage: Storage,
    pub offset: usize,
    pub bytes: usize,
}

/// Each input of the inputs' allocation starts at a multiple of this many bytes (as each
/// part of the staging memory it is copied from does, so that the two layouts agree).
pub const INPUT_ALIGN: usize = 256;

/// The inputs `plan` does not update in place, each with its offset in the inputs'
/// allocation for `symbols` (in input order, each at a multiple of [`INPUT_ALIGN`]), and the
/// allocation's bytes.
pub fn input_block(
    plan: &Plan,
    symbols: &SymbolValues,
) -> Result<(Vec<(BufferId, usize)>, usize), CudaError> {
    let mut placed = Vec::with_capacity(plan.inputs.len());
    let mut end = 0;
    for &id in &plan.inputs {
        if plan.outputs.contains(&id) || placed.iter().any(|&(p, _)| p == id) {
            continue;
        }
        let offset = end;
        end = (offset + buffer_bytes(plan, buffer_decl(plan, id)?, symbols)?)
            .next_multiple_of(INPUT_ALIGN);
        placed.push((id, offset));
    }
    Ok((placed, end))
}

/// Bytes of the arena for `symbols`.
pub fn arena_bytes(plan: &Plan, symbols: &SymbolValues) -> Result<usize, CudaError> {
    eval_size(plan, &plan.arena_bytes, symbols, &|| {
        "the arena size".to_string()
    })
}

/// Device bytes a run of `plan` with `symbols` allocates beside its weights and constants:
/// the arena and the own allocations of its inputs and outputs, except the inputs the plan
/// updates in place (a server sizes those, its KV caches, from what is left after this).
pub fn working_bytes(plan: &Plan, symbols: &SymbolValues) -> Result<usize, CudaError> {
    let mut bytes = arena_bytes(plan, symbols)? + input_block(plan, symbols)?.1;
    let in_place = |id: &BufferId| plan.inputs.contains(id);
    let zeroed = plan
        .buffers
        .iter()
        .filter(|decl| decl.kind == BufferKind::Zeroed)
        .map(|decl| decl.id);
    let own: BTreeSet<BufferId> = plan.outputs.iter().copied().chain(zeroed).collect();
    for id in own.iter().filter(|id| !in_place(id)) {
        bytes += buffer_bytes(plan, buffer_decl(plan, *id)?, symbols)?;
    }
    Ok(bytes)
}

/// Where buffer `id` lives for `symbols`.
pub fn place(plan: &Plan, id: BufferId, symbols: &SymbolValues) -> Result<Placement, CudaError> {
    let decl = buffer_decl(plan, id)?;
    let bytes = buffer_bytes(plan, decl, symbols)?;
    let bad = |detail: String| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail,
    };
    match &decl.kind {
        BufferKind::Input(_) if !plan.outputs.contains(&id) => {
            let (placed, _) = input_block(plan, symbols)?;
            let offset = placed
                .iter()
                .find(|&&(input, _)| input == id)
                .map(|&(_, offset)| offset)
                .ok_or_else(|| {
                    bad(format!(
                        "input buffer b{} is not an input of the plan",
                        id.0
                    ))
                })?;
            Ok(Placement {
                storage: Storage::Inputs,
                offset,
                bytes,
            })
        }
        BufferKind::Input(_)
        | BufferKind::Output(_)
        | BufferKind::Constant(_)
        | BufferKind::Zeroed => Ok(Placement {
            storage: Storage::Own(id),
            offset: 0,
            bytes,
        }),
        BufferKind::Weight(name) => Ok(Placement {
            storage: Storage::Weight(name.clone()),
            offset: 0,
            bytes,
        }),
        BufferKind::Temp => {
            let offset_expr = decl
                .offset
                .as_ref()
                .ok_or_else(|| bad(format!("temp buffer b{} has no arena offset", id.0)))?;
            let offset = eval_size(plan, offset_expr, symbols, &|| {
                format!("the arena offset of b{}", id.0)
            })?;
            let arena = arena_bytes(plan, symbols)?;
            if offset.checked_add(bytes).is_none_or(|end| end > arena) {
                return Err(bad(format!(
                    "temp buffer b{} ({bytes} bytes at offset {offset}) does not fit in the \
                     arena of {arena} bytes ({symbols})",
                    id.0
                )));
            }
            Ok(Placement {
                storage: Storage::Arena,
                offset,
                bytes,
            })
        }
        BufferKind::View(base) => {
            // Resolve the chain first so that a cycle is an error, not a stack overflow.
            view_root(plan, id)?;
            let base_placement = place(plan, *base, symbols)?;
            if bytes > base_placement.bytes {
                return Err(bad(format!(
                    "view b{} has {bytes} bytes, more than the {} of b{} it views ({symbols})",
                    id.0, base_placement.bytes, base.0
                )));
            }
            Ok(Placement {
                bytes,
                ..base_placement
            })
        }
    }
}
