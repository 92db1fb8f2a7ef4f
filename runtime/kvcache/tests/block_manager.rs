//! Behaviour tests of the block manager through its public API: allocation, prefix hits in
//! tokens, LRU eviction, copy-on-write forks, frees and failure atomicity.

use kiln_kvcache::{
    BlockCopy, BlockManager, BlockSize, KvCacheConfig, KvCacheError, SeqId, TokenId,
};

fn manager(num_blocks: usize, block_size: BlockSize) -> BlockManager {
    BlockManager::new(KvCacheConfig::new(num_blocks).with_block_size(block_size)).unwrap()
}

/// `len` distinct tokens starting at `first`.
fn tokens(first: TokenId, len: usize) -> Vec<TokenId> {
    (first..first + len as TokenId).collect()
}

/// Allocates `seq` and computes every token it holds, as a finished prefill would.
fn prefill(manager: &mut BlockManager, seq: u64, token_ids: &[TokenId]) -> usize {
    let seq = SeqId(seq);
    let cached = manager
        .allocate_sequence(seq, token_ids)
        .unwrap()
        .num_cached_tokens;
    let remaining = token_ids.len() - cached;
    assert!(manager.reserve_slots(seq, remaining).unwrap().is_empty());
    manager.mark_computed(seq, remaining).unwrap();
    manager.verify().unwrap();
    cached
}

#[test]
fn fresh_allocation_takes_one_block_per_started_block_of_tokens() {
    let mut cache = manager(10, BlockSize::Tokens16);
    let allocation = cache.allocate_sequence(SeqId(1), &tokens(0, 33)).unwrap();
    assert_eq!(allocation.num_cached_tokens, 0);
    assert_eq!(cache.block_table(SeqId(1)).unwrap().len(), 3);
    assert_eq!(cache.num_free_blocks(), 7);
    assert!((cache.usage() - 0.3).abs() < 1e-12);
    cache.verify().unwrap();
}

#[test]
fn prefix_hits_are_counted_in_tokens_of_whole_computed_blocks() {
    let mut cache = manager(20, BlockSize::Tokens16);
    let shared = tokens(100, 40);
    assert_eq!(prefill(&mut cache, 1, &shared), 0);

    // Shares 40 tokens, but only the two full blocks (32 tokens) are cached.
    let mut longer = shared.clone();
    longer.extend(tokens(900, 10));
    assert_eq!(prefill(&mut cache, 2, &longer), 32);

    // Shares the first 20 tokens: one full block.
    let mut diverging = shared[..20].to_vec();
    diverging.extend(tokens(500, 30));
    assert_eq!(prefill(&mut cache, 3, &diverging), 16);

    // Exactly the cached 32 tokens: the last token must be computed, so one block hits.
    assert_eq!(prefill(&mut cache, 4, &shared[..32]), 16);

    let stats = cache.stats();
    assert_eq!(stats.prefix_cache_queries, (40 + 50 + 50 + 32) as u64);
    assert_eq!(stats.prefix_cache_hits, (32 + 16 + 16) as u64);
}

#[test]
fn hit_blocks_are_shared_not_copied() {
    let mut cache = manager(20, BlockSize::Tokens8);
    prefill(&mut cache, 1, &tokens(0, 20));
    prefill(&mut cache, 2, &tokens(0, 20));
    let first = cache.block_table(SeqId(1)).unwrap().to_vec();
    let second = cache.block_table(SeqId(2)).unwrap().to_vec();
    assert_eq!(first[..2], second[..2]);
    assert_ne!(first[2], second[2]);
    assert_eq!(cache.ref_count(first[0]).unwrap(), 2);
    assert_eq!(cache.ref_count(first[2]).unwrap(), 1);
}

#[test]
fn blocks_are_findable_only_once_computed() {
    let mut cache = manager(20, BlockSize::Tokens16);
    let prompt = tokens(0, 48);
    cache.allocate_sequence(SeqId(1), &prompt).unwrap();
    cache.reserve_slots(SeqId(1), 20).unwrap();
    cache.mark_computed(SeqId(1), 20).unwrap();
    // Only the first block is full and computed.
    assert_eq!(cache.cached_prefix_len(&prompt), 16);
    cache.mark_computed(SeqId(1), 28).unwrap();
    assert_eq!(cache.cached_prefix_len(&prompt), 32);
    assert_eq!(cache.cached_prefix_len(&tokens(0, 49)), 48);
}

#[test]
fn freed_blocks_stay_findable_and_count_as_free() {
    let mut cache = manager(4, BlockSize::Tokens16);
    let prompt = tokens(0, 40);
    prefill(&mut cache, 1, &prompt);
    cache.free_sequence(SeqId(1)).unwrap();
    assert_eq!(cache.num_free_blocks(), 4);
    assert_eq!(cache.stats().num_evictable_blocks, 2);
    assert_eq!(prefill(&mut cache, 2, &prompt), 32);
    assert_eq!(cache.num_free_blocks(), 1);
}

#[test]
fn eviction_takes_plain_free_blocks_first_then_least_recently_freed() {
    let mut cache = manager(6, BlockSize::Tokens8);
    let a = tokens(0, 17);
    let b = tokens(1000, 17);
    prefill(&mut cache, 1, &a);
    prefill(&mut cache, 2, &b);
    cache.free_sequence(SeqId(1)).unwrap();
    cache.free_sequence(SeqId(2)).unwrap();
    // Touch `a` again so that its blocks become the most recently freed.
    assert_eq!(prefill(&mut cache, 3, &a), 16);
    cache.free_sequence(SeqId(3)).unwrap();
    assert_eq!(cache.stats().num_evictable_blocks, 4);

    // Two plain free blocks (the partial tails) go first: nothing cached is lost.
    cache
        .allocate_sequence(SeqId(4), &tokens(5000, 16))
        .unwrap();
    assert_eq!(cache.cached_prefix_len(&a), 16);
    assert_eq!(cache.cached_prefix_len(&b), 16);
    assert_eq!(cache.stats().num_evictions, 0);

    // Next comes `b`, freed longest ago, tail block first.
    cache.allocate_sequence(SeqId(5), &tokens(6000, 8)).unwrap();
    assert_eq!(cache.cached_prefix_len(&b), 8);
    assert_eq!(cache.cached_prefix_len(&a), 16);
    cache.allocate_sequence(SeqId(6), &tokens(7000, 8)).unwrap();
    assert_eq!(cache.cached_prefix_len(&b), 0);
    assert_eq!(cache.cached_prefix_len(&a), 16);
    cache.allocate_sequence(SeqId(7), &tokens(8000, 8)).unwrap();
    assert_eq!(cache.cached_prefix_len(&a), 8);
    assert_eq!(cache.stats().num_evictions, 3);
    cache.verify().unwrap();
}

#[test]
fn fork_shares_blocks_and_copies_on_write_into_a_shared_partial_block() {
    let mut cache = manager(10, BlockSize::Tokens16);
    prefill(&mut cache, 1, &tokens(0, 20));
    cache.fork(SeqId(1), SeqId(2)).unwrap();
    let parent_table = cache.block_table(SeqId(1)).unwrap().to_vec();
    assert_eq!(
        cache.block_table(SeqId(2)).unwrap(),
        parent_table.as_slice()
    );
    for &block in &parent_table {
        assert_eq!(cache.ref_count(block).unwrap(), 2);
    }
    assert_eq!(cache.num_free_blocks(), 8);

    cache.append_tokens(SeqId(2), &[77]).unwrap();
    let copies = cache.reserve_slots(SeqId(2), 1).unwrap();
    let child_table = cache.block_table(SeqId(2)).unwrap().to_vec();
    assert_eq!(child_table[0], parent_table[0]);
    assert_ne!(child_table[1], parent_table[1]);
    assert_eq!(
        copies,
        vec![BlockCopy {
            src: parent_table[1],
            dst: child_table[1]
        }]
    );
    assert_eq!(cache.ref_count(parent_table[0]).unwrap(), 2);
    assert_eq!(cache.ref_count(parent_table[1]).unwrap(), 1);

    // The parent now owns its block alone: no copy.
    cache.append_tokens(SeqId(1), &[88]).unwrap();
    assert!(cache.reserve_slots(SeqId(1), 1).unwrap().is_empty());
    assert_eq!(
        cache.block_table(SeqId(1)).unwrap(),
        parent_table.as_slice()
    );
    cache.verify().unwrap();
}

#[test]
fn fork_at_a_block_boundary_needs_no_copy() {
    let mut cache = manager(10, BlockSize::Tokens16);
    prefill(&mut cache, 1, &tokens(0, 16));
    cache.fork(SeqId(1), SeqId(2)).unwrap();
    cache.append_tokens(SeqId(2), &[5]).unwrap();
    assert!(cache.reserve_slots(SeqId(2), 1).unwrap().is_empty());
    let child_table = cache.block_table(SeqId(2)).unwrap();
    assert_eq!(child_table.len(), 2);
    assert_eq!(cache.ref_count(child_table[0]).unwrap(), 2);
    assert_eq!(cache.ref_count(child_table[1]).unwrap(), 1);
}

#[test]
fn fork_of_unwritten_shared_blocks_swaps_without_copying() {
    let mut cache = manager(10, BlockSize::Tokens8);
    cache.allocate_sequence(SeqId(1), &tokens(0, 20)).unwrap();
    cache.reserve_slots(SeqId(1), 4).unwrap();
    cache.mark_computed(SeqId(1), 4).unwrap();
    cache.fork(SeqId(1), SeqId(2)).unwrap();
    // Writes positions 4..20: block 0 (partly written) is copied, blocks 1 and 2 are fresh.
    let copies = cache.reserve_slots(SeqId(2), 16).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src, cache.block_table(SeqId(1)).unwrap()[0]);
    assert_eq!(cache.num_free_blocks(), 4);
    cache.verify().unwrap();
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut cache = manager(3, BlockSize::Tokens16);
    prefill(&mut cache, 1, &tokens(0, 20));
    let before = cache.stats();
    assert_eq!(
        cache.allocate_sequence(SeqId(2), &tokens(500, 33)),
        Err(KvCacheError::OutOfBlocks { needed: 3, free: 1 })
    );
    assert_eq!(cache.stats(), before);
    assert!(!cache.contains(SeqId(2)));

    cache.fork(SeqId(1), SeqId(3)).unwrap();
    cache.allocate_sequence(SeqId(4), &tokens(900, 1)).unwrap();
    cache.append_tokens(SeqId(3), &tokens(2000, 20)).unwrap();
    let table_before = cache.block_table(SeqId(3)).unwrap().to_vec();
    assert!(matches!(
        cache.reserve_slots(SeqId(3), 20),
        Err(KvCacheError::OutOfBlocks { .. })
    ));
    assert_eq!(
        cache.block_table(SeqId(3)).unwrap(),
        table_before.as_slice()
    );
    cache.verify().unwrap();
}

#[test]
fn freeing_returns_every_block_exactly_once() {
    let mut cache = manager(8, BlockSize::Tokens8);
    prefill(&mut cache, 1, &tokens(0, 30));
    cache.fork(SeqId(1), SeqId(2)).unwrap();
    cache.append_tokens(SeqId(2), &[1]).unwrap();
    cache.reserve_slots(SeqId(2), 1).unwrap();
    cache.free_sequence(SeqId(1)).unwrap();
    assert_eq!(cache.num_free_blocks(), 4);
    cache.free_sequence(SeqId(2)).unwrap();
    assert_eq!(cache.num_free_blocks(), 8);
    assert_eq!(
        cache.free_sequence(SeqId(2)),
        Err(KvCacheError::UnknownSequence(SeqId(2)))
    );
    cache.verify().unwrap();
}

#[test]
fn misuse_is_reported() {
    let mut cache = manager(8, BlockSize::Tokens8);
    assert_eq!(
        cache.allocate_sequence(SeqId(1), &[]),
        Err(KvCacheError::EmptySequence(SeqId(1)))
    );
    cache.allocate_sequence(SeqId(1), &tokens(0, 5)).unwrap();
    assert_eq!(
        cache.allocate_sequence(SeqId(1), &tokens(0, 5)),
        Err(KvCacheError::SequenceExists(SeqId(1)))
    );
    assert!(matches!(
        cache.reserve_slots(SeqId(1), 6),
        Err(KvCacheError::BeyondKnownTokens {
            requested: 6,
            known: 5,
            ..
        })
    ));
    cache.append_tokens(SeqId(1), &tokens(5, 10)).unwrap();
    assert!(matches!(
        cache.mark_computed(SeqId(1), 9),
        Err(KvCacheError::SlotsNotReserved {
            requested: 9,
            reserved: 8,
            ..
        })
    ));
    assert_eq!(
        cache.fork(SeqId(9), SeqId(10)),
        Err(KvCacheError::UnknownSequence(SeqId(9)))
    );
    assert!(BlockManager::new(KvCacheConfig::new(0)).is_err());
    assert_eq!(BlockSize::try_from(16), Ok(BlockSize::Tokens16));
    assert_eq!(
        BlockSize::try_from(12),
        Err(KvCacheError::InvalidBlockSize(12))
    );
    assert_eq!(BlockSize::default(), BlockSize::Tokens16);
}

#[test]
fn identical_prompts_computed_at_once_cache_one_copy() {
    let mut cache = manager(10, BlockSize::Tokens8);
    let prompt = tokens(0, 17);
    cache.allocate_sequence(SeqId(1), &prompt).unwrap();
    cache.allocate_sequence(SeqId(2), &prompt).unwrap();
    for seq in [SeqId(1), SeqId(2)] {
        cache.reserve_slots(seq, 17).unwrap();
        cache.mark_computed(seq, 17).unwrap();
    }
    assert_eq!(cache.stats().num_cached_blocks, 2);
    cache.free_sequence(SeqId(1)).unwrap();
    cache.free_sequence(SeqId(2)).unwrap();
    assert_eq!(prefill(&mut cache, 3, &prompt), 16);
}

#[test]
fn prefix_caching_can_be_switched_off() {
    let config = KvCacheConfig::new(10)
        .with_block_size(BlockSize::Tokens8)
        .with_prefix_caching(false);
    let mut cache = BlockManager::new(config).unwrap();
    prefill(&mut cache, 1, &tokens(0, 30));
    assert_eq!(prefill(&mut cache, 2, &tokens(0, 30)), 0);
    let stats = cache.stats();
    assert_eq!(
        (stats.prefix_cache_queries, stats.prefix_cache_hits),
        (0, 0)
    );
    assert_eq!(stats.num_cached_blocks, 0);
}

#[test]
fn every_block_size_hits_in_multiples_of_itself() {
    for block_size in BlockSize::ALL {
        let mut cache = manager(64, block_size);
        prefill(&mut cache, 1, &tokens(0, 100));
        let expected = (99 / block_size.tokens()) * block_size.tokens();
        assert_eq!(
            prefill(&mut cache, 2, &tokens(0, 100)),
            expected,
            "{block_size}"
        );
    }
}
