//! The physical block pool: reference counts, the free list, the prefix-cache index and its
//! LRU evictor.
//!
//! Every block is in exactly one of three states:
//! - **in use**: reference count > 0 (it may also carry a prefix-cache key);
//! - **free**: reference count 0, no cache key, queued in `free_uncached` (handed out first);
//! - **evictable**: reference count 0 but still hashed and findable, queued in `evictable` by the
//!   time it was freed; it is evicted (its key dropped) only when no free block is left.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::hash::BlockHash;
use crate::types::{BlockId, TokenId};

/// What a hashed block holds: enough to verify a hash hit exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CacheKey {
    pub(crate) hash: BlockHash,
    pub(crate) parent: Option<BlockHash>,
    pub(crate) tokens: Box<[TokenId]>,
}

#[derive(Clone, Debug, Default)]
struct BlockState {
    ref_count: u32,
    cache_key: Option<CacheKey>,
    /// Position in the LRU evictor while the block is evictable.
    evictable_since: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<BlockState>,
    free_uncached: VecDeque<BlockId>,
    /// Evictable blocks by the tick at which they were freed; the smallest tick goes first.
    evictable: BTreeMap<u64, BlockId>,
    /// Hash -> block, for lookups only (never iterated where order matters).
    cached: HashMap<BlockHash, BlockId>,
    next_tick: u64,
    num_evictions: u64,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        let num_blocks = u32::try_from(num_blocks).expect("block count fits in u32");
        BlockPool {
            blocks: vec![BlockState::default(); num_blocks as usize],
            free_uncached: (0..num_blocks).map(BlockId).collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            next_tick: 0,
            num_evictions: 0,
        }
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now: plain free ones plus evictable cached ones.
    pub(crate) fn num_free(&self) -> usize {
        self.free_uncached.len() + self.evictable.len()
    }

    pub(crate) fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    pub(crate) fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub(crate) fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    pub(crate) fn contains(&self, block: BlockId) -> bool {
        block.index() < self.blocks.len()
    }

    pub(crate) fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block.index()].ref_count
    }

    pub(crate) fn cache_key(&self, block: BlockId) -> Option<&CacheKey> {
        self.blocks[block.index()].cache_key.as_ref()
    }

    /// Takes a block for exclusive use (reference count 1), evicting the least recently freed
    /// cached block when no plain free block is left. `None` when the pool is exhausted.
    pub(crate) fn take_free(&mut self) -> Option<BlockId> {
        let block = match self.free_uncached.pop_front() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                let state = &mut self.blocks[block.index()];
                state.evictable_since = None;
                if let Some(key) = state.cache_key.take() {
                    self.cached.remove(&key.hash);
                }
                self.num_evictions += 1;
                block
            }
        };
        let state = &mut self.blocks[block.index()];
        debug_assert_eq!(state.ref_count, 0);
        debug_assert!(state.cache_key.is_none());
        state.ref_count = 1;
        Some(block)
    }

    /// The cached block holding exactly `tokens` after `parent`, if any.
    pub(crate) fn lookup(
        &self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[TokenId],
    ) -> Option<BlockId> {
        let &block = self.cached.get(&hash)?;
        let key = self.blocks[block.index()].cache_key.as_ref()?;
        (key.hash == hash && key.parent == parent && *key.tokens == *tokens).then_some(block)
    }

    /// Adds a reference; revives the block from the evictor if it was free.
    pub(crate) fn acquire(&mut self, block: BlockId) {
        let state = &mut self.blocks[block.index()];
        if let Some(tick) = state.evictable_since.take() {
            self.evictable.remove(&tick);
        }
        debug_assert!(state.ref_count > 0 || state.cache_key.is_some());
        state.ref_count += 1;
    }

    /// Drops a reference; at zero the block becomes evictable (if hashed) or free.
    pub(crate) fn release(&mut self, block: BlockId) {
        let state = &mut self.blocks[block.index()];
        debug_assert!(state.ref_count > 0, "{block} released twice");
        state.ref_count -= 1;
        if state.ref_count > 0 {
            return;
        }
        if state.cache_key.is_some() {
            let tick = self.next_tick;
            self.next_tick += 1;
            state.evictable_since = Some(tick);
            self.evictable.insert(tick, block);
        } else {
            self.free_uncached.push_back(block);
        }
    }

    /// Makes an in-use block findable under `key`. Returns false (and changes nothing) when
    /// another block already holds that hash.
    pub(crate) fn register(&mut self, block: BlockId, key: CacheKey) -> bool {
        if self.cached.contains_key(&key.hash) {
            return false;
        }
        let state = &mut self.blocks[block.index()];
        debug_assert!(state.ref_count > 0 && state.cache_key.is_none());
        self.cached.insert(key.hash, block);
        state.cache_key = Some(key);
        true
    }

    /// Checks the pool's own invariants; `expected_refs` gives each block's number of
    /// block-table references.
    pub(crate) fn verify(&self, expected_refs: &[u32]) -> Result<(), String> {
        let mut in_free_list = vec![false; self.blocks.len()];
        for &block in &self.free_uncached {
            if std::mem::replace(&mut in_free_list[block.index()], true) {
                return Err(format!("{block} is on the free list twice"));
            }
        }
        let mut in_evictor = vec![false; self.blocks.len()];
        for (&tick, &block) in &self.evictable {
            if std::mem::replace(&mut in_evictor[block.index()], true) {
                return Err(format!("{block} is in the evictor twice"));
            }
            if self.blocks[block.index()].evictable_since != Some(tick) {
                return Err(format!("{block} is in the evictor under a stale tick"));
            }
        }
        let mut num_used = 0;
        for (index, state) in self.blocks.iter().enumerate() {
            let block = BlockId(index as u32);
            if state.ref_count != expected_refs[index] {
                return Err(format!(
                    "{block} has reference count {} but {} block-table references",
                    state.ref_count, expected_refs[index]
                ));
            }
            let placements = usize::from(state.ref_count > 0)
                + usize::from(in_free_list[index])
                + usize::from(in_evictor[index]);
            if placements != 1 {
                return Err(format!(
                    "{block} is in {placements} of used/free/evictable (ref count {})",
                    state.ref_count
                ));
            }
            if in_free_list[index] && state.cache_key.is_some() {
                return Err(format!(
                    "{block} is on the plain free list but still hashed"
                ));
            }
            if in_evictor[index] && state.cache_key.is_none() {
                return Err(format!("{block} is evictable but not hashed"));
            }
            if !in_evictor[index] && state.evictable_since.is_some() {
                return Err(format!(
                    "{block} remembers an evictor tick it does not have"
                ));
            }
            if let Some(key) = &state.cache_key {
                if self.cached.get(&key.hash) != Some(&block) {
                    return Err(format!("{block} is hashed but not indexed under its hash"));
                }
            }
            num_used += usize::from(state.ref_count > 0);
        }
        if num_used + self.num_free() != self.blocks.len() {
            return Err(format!(
                "{num_used} used + {} free != {} blocks",
                self.num_free(),
                self.blocks.len()
            ));
        }
        // Each hashed block is indexed under its own hash (checked above); equal sizes make the
        // index exactly those entries.
        let num_hashed = self
            .blocks
            .iter()
            .filter(|state| state.cache_key.is_some())
            .count();
        if num_hashed != self.cached.len() {
            return Err(format!(
                "{} hash index entries for {num_hashed} hashed blocks",
                self.cached.len()
            ));
        }
        Ok(())
    }
}
