//! The block manager: per-sequence block tables on top of the pool, prefix-cache lookups on
//! allocation, decode slots with copy-on-write, forks, frees and statistics.

use std::collections::BTreeMap;

use crate::error::KvCacheError;
use crate::hash::{chain_block_hash, BlockHash};
use crate::pool::{BlockPool, CacheKey};
use crate::types::{BlockCopy, BlockId, BlockSize, SeqId, TokenId};

/// Shape of the cache: how many blocks of how many tokens, and whether prefix caching is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Tokens per block.
    pub block_size: BlockSize,
    /// Blocks in the pool (see [`crate::num_blocks_for_memory`]).
    pub num_blocks: usize,
    /// Whether full blocks are hashed and reused across sequences (on by default).
    pub enable_prefix_caching: bool,
}

impl KvCacheConfig {
    /// `num_blocks` blocks of the default 16 tokens, prefix caching on.
    pub fn new(num_blocks: usize) -> Self {
        KvCacheConfig {
            block_size: BlockSize::default(),
            num_blocks,
            enable_prefix_caching: true,
        }
    }

    /// The same configuration with another block size.
    pub fn with_block_size(self, block_size: BlockSize) -> Self {
        KvCacheConfig { block_size, ..self }
    }

    /// The same configuration with prefix caching switched on or off.
    pub fn with_prefix_caching(self, enable_prefix_caching: bool) -> Self {
        KvCacheConfig {
            enable_prefix_caching,
            ..self
        }
    }

    /// Tokens the whole cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size.tokens()
    }
}

/// What [`BlockManager::allocate_sequence`] found in the prefix cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Leading tokens whose KV is already in the cache (a whole number of blocks); the
    /// sequence starts with this many tokens computed.
    pub num_cached_tokens: usize,
}

/// A snapshot of the cache's counters, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheStats {
    /// Tokens per block.
    pub block_size: BlockSize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Blocks that can be handed out (plain free + evictable cached).
    pub num_free_blocks: usize,
    /// Free blocks that are still findable by prefix hash.
    pub num_evictable_blocks: usize,
    /// Blocks currently findable by prefix hash (in use or evictable).
    pub num_cached_blocks: usize,
    /// Prompt tokens looked up in the prefix cache (counted on successful allocations).
    pub prefix_cache_queries: u64,
    /// Of those, tokens found in the cache.
    pub prefix_cache_hits: u64,
    /// Cached blocks whose hash was dropped so the block could be reused.
    pub num_evictions: u64,
}

impl CacheStats {
    /// Blocks held by sequences.
    pub fn num_used_blocks(&self) -> usize {
        self.num_blocks - self.num_free_blocks
    }

    /// Fraction of blocks held by sequences, in [0, 1] (the `kv_cache_usage_perc` gauge).
    pub fn usage(&self) -> f64 {
        if self.num_blocks == 0 {
            return 0.0;
        }
        self.num_used_blocks() as f64 / self.num_blocks as f64
    }
}

/// Per-sequence bookkeeping.
#[derive(Clone, Debug)]
struct SequenceBlocks {
    /// Every token of the sequence so far (prompt and generated).
    token_ids: Vec<TokenId>,
    /// Physical block of each logical block, in order.
    block_table: Vec<BlockId>,
    /// Leading tokens whose KV has been written.
    num_computed: usize,
    /// Chain hashes of the leading full, computed blocks.
    full_block_hashes: Vec<BlockHash>,
}

/// Paged KV-cache block manager. See the crate documentation for the invariants it keeps.
#[derive(Debug)]
pub struct BlockManager {
    config: KvCacheConfig,
    pool: BlockPool,
    sequences: BTreeMap<SeqId, SequenceBlocks>,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
}

impl BlockManager {
    /// An empty cache. Fails when the configuration has no blocks.
    pub fn new(config: KvCacheConfig) -> Result<Self, KvCacheError> {
        if config.num_blocks == 0 {
            return Err(KvCacheError::NoBlocks);
        }
        if u32::try_from(config.num_blocks).is_err() {
            return Err(KvCacheError::InvalidBlockCount(config.num_blocks));
        }
        Ok(BlockManager {
            config,
            pool: BlockPool::new(config.num_blocks),
            sequences: BTreeMap::new(),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        })
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Tokens per block.
    pub fn block_size(&self) -> BlockSize {
        self.config.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks that can be handed out now (plain free + evictable cached).
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Fraction of blocks held by sequences.
    pub fn usage(&self) -> f64 {
        self.stats().usage()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            block_size: self.config.block_size,
            num_blocks: self.pool.num_blocks(),
            num_free_blocks: self.pool.num_free(),
            num_evictable_blocks: self.pool.num_evictable(),
            num_cached_blocks: self.pool.num_cached(),
            prefix_cache_queries: self.prefix_cache_queries,
            prefix_cache_hits: self.prefix_cache_hits,
            num_evictions: self.pool.num_evictions(),
        }
    }

    /// Whether `seq` holds blocks.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.sequences.contains_key(&seq)
    }

    /// Allocated sequences, in id order.
    pub fn sequence_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// The sequence's block table (physical block of each logical block).
    pub fn block_table(&self, seq: SeqId) -> Result<&[BlockId], KvCacheError> {
        Ok(&self.sequence(seq)?.block_table)
    }

    /// All tokens the sequence holds (computed or not).
    pub fn token_ids(&self, seq: SeqId) -> Result<&[TokenId], KvCacheError> {
        Ok(&self.sequence(seq)?.token_ids)
    }

    /// Leading tokens of the sequence whose KV has been written.
    pub fn num_computed_tokens(&self, seq: SeqId) -> Result<usize, KvCacheError> {
        Ok(self.sequence(seq)?.num_computed)
    }

    /// Number of block-table references the block has (0 when free or evictable).
    pub fn ref_count(&self, block: BlockId) -> Result<u32, KvCacheError> {
        if !self.pool.contains(block) {
            return Err(KvCacheError::UnknownBlock(block));
        }
        Ok(self.pool.ref_count(block))
    }

    /// Whether the block is findable in the prefix cache.
    pub fn is_cached(&self, block: BlockId) -> Result<bool, KvCacheError> {
        if !self.pool.contains(block) {
            return Err(KvCacheError::UnknownBlock(block));
        }
        Ok(self.pool.cache_key(block).is_some())
    }

    /// Prompt tokens (a whole number of blocks) that [`Self::allocate_sequence`] would find in
    /// the prefix cache now. Counts nothing in the statistics.
    pub fn cached_prefix_len(&self, token_ids: &[TokenId]) -> usize {
        self.find_cached_prefix(token_ids).0.len() * self.config.block_size.tokens()
    }

    /// Admits a new sequence holding `token_ids`: reuses the longest cached prefix of full
    /// blocks and allocates fresh blocks for the rest. At least the last token is always left
    /// to compute (the model needs its logits), so a fully cached prompt hits one block less.
    ///
    /// On `OutOfBlocks` nothing changes (not even the statistics).
    pub fn allocate_sequence(
        &mut self,
        seq: SeqId,
        token_ids: &[TokenId],
    ) -> Result<Allocation, KvCacheError> {
        if self.sequences.contains_key(&seq) {
            return Err(KvCacheError::SequenceExists(seq));
        }
        if token_ids.is_empty() {
            return Err(KvCacheError::EmptySequence(seq));
        }
        let (hit_blocks, hit_hashes) = self.find_cached_prefix(token_ids);
        let num_new_blocks = self.config.block_size.blocks_for(token_ids.len()) - hit_blocks.len();
        let revived_blocks = hit_blocks
            .iter()
            .filter(|&&block| self.pool.ref_count(block) == 0)
            .count();
        let needed = num_new_blocks + revived_blocks;
        if needed > self.pool.num_free() {
            return Err(KvCacheError::OutOfBlocks {
                needed,
                free: self.pool.num_free(),
            });
        }
        // Take the hits first so that allocating the new blocks cannot evict them.
        for &block in &hit_blocks {
            self.pool.acquire(block);
        }
        let mut block_table = hit_blocks;
        for _ in 0..num_new_blocks {
            block_table.push(self.take_block());
        }
        let num_cached_tokens = hit_hashes.len() * self.config.block_size.tokens();
        if self.config.enable_prefix_caching {
            self.prefix_cache_queries += token_ids.len() as u64;
            self.prefix_cache_hits += num_cached_tokens as u64;
        }
        self.sequences.insert(
            seq,
            SequenceBlocks {
                token_ids: token_ids.to_vec(),
                block_table,
                num_computed: num_cached_tokens,
                full_block_hashes: hit_hashes,
            },
        );
        Ok(Allocation { num_cached_tokens })
    }

    /// Appends tokens (typically the token just sampled) to the sequence. Takes no block:
    /// call [`Self::reserve_slots`] before computing them.
    pub fn append_tokens(&mut self, seq: SeqId, token_ids: &[TokenId]) -> Result<(), KvCacheError> {
        self.sequence_mut(seq)?
            .token_ids
            .extend_from_slice(token_ids);
        Ok(())
    }

    /// Makes sure the next `num_tokens` uncomputed tokens of the sequence have slots the
    /// sequence owns alone: allocates missing blocks and copies-on-write any block in that range
    /// that is shared with another sequence. Returns the copies the engine must perform (in
    /// order, before the forward pass). On `OutOfBlocks` nothing changes.
    pub fn reserve_slots(
        &mut self,
        seq: SeqId,
        num_tokens: usize,
    ) -> Result<Vec<BlockCopy>, KvCacheError> {
        let block_size = self.config.block_size.tokens();
        let sequence = self.sequence(seq)?;
        let start = sequence.num_computed;
        let end = start + num_tokens;
        if end > sequence.token_ids.len() {
            return Err(KvCacheError::BeyondKnownTokens {
                seq,
                requested: end,
                known: sequence.token_ids.len(),
            });
        }
        if num_tokens == 0 {
            return Ok(Vec::new());
        }
        let first_written = start / block_size;
        let blocks_needed = end.div_ceil(block_size);
        let num_missing = blocks_needed.saturating_sub(sequence.block_table.len());
        let shared: Vec<usize> = (first_written..blocks_needed.min(sequence.block_table.len()))
            .filter(|&index| self.pool.ref_count(sequence.block_table[index]) > 1)
            .collect();
        let needed = num_missing + shared.len();
        if needed > self.pool.num_free() {
            return Err(KvCacheError::OutOfBlocks {
                needed,
                free: self.pool.num_free(),
            });
        }
        let sequence = self
            .sequences
            .get_mut(&seq)
            .expect("sequence checked above");
        let pool = &mut self.pool;
        let mut copies = Vec::new();
        for index in shared {
            let shared_block = sequence.block_table[index];
            let private_block = pool.take_free().expect("counted above");
            debug_assert!(
                pool.cache_key(shared_block).is_none(),
                "a hashed block is full and never written"
            );
            // Still referenced by the other sharers, so this never frees it.
            pool.release(shared_block);
            sequence.block_table[index] = private_block;
            if index * block_size < start {
                copies.push(BlockCopy {
                    src: shared_block,
                    dst: private_block,
                });
            }
        }
        for _ in 0..num_missing {
            let block = pool.take_free().expect("counted above");
            sequence.block_table.push(block);
        }
        Ok(copies)
    }

    /// Records that the next `num_tokens` tokens of the sequence now have their KV written.
    /// Blocks that became full are hashed and made findable by later sequences.
    pub fn mark_computed(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), KvCacheError> {
        let block_size = self.config.block_size.tokens();
        let enable_prefix_caching = self.config.enable_prefix_caching;
        let sequence = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvCacheError::UnknownSequence(seq))?;
        let end = sequence.num_computed + num_tokens;
        if end > sequence.token_ids.len() {
            return Err(KvCacheError::BeyondKnownTokens {
                seq,
                requested: end,
                known: sequence.token_ids.len(),
            });
        }
        let reserved = sequence.block_table.len() * block_size;
        if end > reserved {
            return Err(KvCacheError::SlotsNotReserved {
                seq,
                requested: end,
                reserved,
            });
        }
        sequence.num_computed = end;
        if !enable_prefix_caching {
            return Ok(());
        }
        for index in sequence.full_block_hashes.len()..end / block_size {
            let parent = sequence.full_block_hashes.last().copied();
            let tokens = &sequence.token_ids[index * block_size..(index + 1) * block_size];
            let hash = chain_block_hash(parent, tokens);
            sequence.full_block_hashes.push(hash);
            let block = sequence.block_table[index];
            match self.pool.cache_key(block) {
                Some(key) => debug_assert_eq!(key.hash, hash, "{block} cached under another hash"),
                None => {
                    // A block with the same contents may already be cached (two requests
                    // computed the same prefix at once); keep the first, this one stays private.
                    self.pool.register(
                        block,
                        CacheKey {
                            hash,
                            parent,
                            tokens: tokens.into(),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Starts `child` as a copy of `parent` that shares all of its blocks (reference counts go
    /// up; nothing is copied until one of them writes into a shared block).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), KvCacheError> {
        if self.sequences.contains_key(&child) {
            return Err(KvCacheError::SequenceExists(child));
        }
        let copy = self.sequence(parent)?.clone();
        for &block in &copy.block_table {
            self.pool.acquire(block);
        }
        self.sequences.insert(child, copy);
        Ok(())
    }

    /// Releases every block of the sequence (on finish, abort or preemption). Hashed blocks
    /// stay findable until evicted; the tail of the sequence is queued for eviction before its
    /// head, since a chain's head is what later prompts can hit.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), KvCacheError> {
        let sequence = self
            .sequences
            .remove(&seq)
            .ok_or(KvCacheError::UnknownSequence(seq))?;
        for &block in sequence.block_table.iter().rev() {
            self.pool.release(block);
        }
        Ok(())
    }

    /// Checks every invariant of the cache (listed in the crate documentation): each block is
    /// exactly one of used / free / evictable, `used + free == total`, each reference count equals
    /// the number of block-table references, the hash index matches the blocks' keys, and each
    /// sequence's computed prefix lies inside its block table with consistent hashes.
    pub fn verify(&self) -> Result<(), KvCacheError> {
        let block_size = self.config.block_size.tokens();
        let mut references = vec![0u32; self.pool.num_blocks()];
        for (&seq, sequence) in &self.sequences {
            let violated =
                |message: String| KvCacheError::InvariantViolated(format!("{seq}: {message}"));
            let mut seen = std::collections::BTreeSet::new();
            for &block in &sequence.block_table {
                if !self.pool.contains(block) {
                    return Err(violated(format!("{block} is outside the pool")));
                }
                if !seen.insert(block) {
                    return Err(violated(format!(
                        "{block} appears twice in one block table"
                    )));
                }
                references[block.index()] += 1;
            }
            if sequence.num_computed > sequence.token_ids.len() {
                return Err(violated("more tokens computed than known".into()));
            }
            if sequence.num_computed > sequence.block_table.len() * block_size {
                return Err(violated("computed tokens outside the block table".into()));
            }
            if sequence.full_block_hashes.len() > sequence.num_computed / block_size {
                return Err(violated(
                    "hashes for blocks that are not full and computed".into(),
                ));
            }
            let mut parent = None;
            for (index, &hash) in sequence.full_block_hashes.iter().enumerate() {
                let tokens = &sequence.token_ids[index * block_size..(index + 1) * block_size];
                if chain_block_hash(parent, tokens) != hash {
                    return Err(violated(format!("block {index} has a stale hash")));
                }
                if let Some(key) = self.pool.cache_key(sequence.block_table[index]) {
                    if key.hash != hash || *key.tokens != *tokens {
                        return Err(violated(format!(
                            "block {index} is cached under other contents"
                        )));
                    }
                }
                parent = Some(hash);
            }
        }
        self.pool
            .verify(&references)
            .map_err(KvCacheError::InvariantViolated)?;
        if self.prefix_cache_hits > self.prefix_cache_queries {
            return Err(KvCacheError::InvariantViolated(
                "more prefix-cache hits than queries".into(),
            ));
        }
        Ok(())
    }

    fn sequence(&self, seq: SeqId) -> Result<&SequenceBlocks, KvCacheError> {
        self.sequences
            .get(&seq)
            .ok_or(KvCacheError::UnknownSequence(seq))
    }

    fn sequence_mut(&mut self, seq: SeqId) -> Result<&mut SequenceBlocks, KvCacheError> {
        self.sequences
            .get_mut(&seq)
            .ok_or(KvCacheError::UnknownSequence(seq))
    }

    fn take_block(&mut self) -> BlockId {
        self.pool
            .take_free()
            .expect("caller checked that enough blocks are free")
    }

    /// Cached blocks (and their chain hashes) for the longest prefix of `token_ids` made of full
    /// blocks, leaving at least the last token uncached.
    fn find_cached_prefix(&self, token_ids: &[TokenId]) -> (Vec<BlockId>, Vec<BlockHash>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        if !self.config.enable_prefix_caching || token_ids.is_empty() {
            return (blocks, hashes);
        }
        let block_size = self.config.block_size.tokens();
        let max_hit_blocks = (token_ids.len() - 1) / block_size;
        let mut parent = None;
        for tokens in token_ids.chunks_exact(block_size).take(max_hit_blocks) {
            let hash = chain_block_hash(parent, tokens);
            match self.pool.lookup(hash, parent, tokens) {
                Some(block) => {
                    blocks.push(block);
                    hashes.push(hash);
                    parent = Some(hash);
                }
                None => break,
            }
        }
        (blocks, hashes)
    }
}
