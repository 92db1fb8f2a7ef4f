//! Property tests: random sequences of allocations, partial prefills, decode appends, forks and
//! frees against a simulated device cache, checking block accounting and the KV each sequence
//! reads after every operation.

use std::collections::{BTreeMap, BTreeSet};

use kiln_kvcache::{BlockManager, BlockSize, KvCacheConfig, KvCacheError, SeqId, TokenId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// A new sequence: `prefix_len` tokens of shared prefix `prefix`, then a unique tail.
    Allocate {
        prefix: usize,
        prefix_len: usize,
        tail_len: usize,
    },
    /// Compute up to `num_tokens` uncomputed tokens of a live sequence (one prefill chunk).
    Compute {
        pick: usize,
        num_tokens: usize,
    },
    /// Append a sampled token and compute everything still uncomputed (a decode step).
    Decode {
        pick: usize,
        token: TokenId,
    },
    Fork {
        pick: usize,
    },
    Free {
        pick: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..70usize, 0..20usize).prop_map(|(prefix, prefix_len, tail_len)| Op::Allocate {
            prefix,
            prefix_len,
            tail_len,
        }),
        3 => (any::<usize>(), 1..40usize).prop_map(|(pick, num_tokens)| Op::Compute { pick, num_tokens }),
        3 => (any::<usize>(), 0..50u32).prop_map(|(pick, token)| Op::Decode { pick, token }),
        1 => any::<usize>().prop_map(|pick| Op::Fork { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

/// What a slot of the simulated device cache holds: the token and position written there.
type Slot = Option<(TokenId, usize)>;

/// A stand-in for the device: per-slot contents, written the way the engine would.
struct Harness {
    cache: BlockManager,
    block_size: usize,
    slots: Vec<Slot>,
    /// Block-aligned prefixes whose KV has been computed at some point.
    computed_prefixes: BTreeSet<Vec<TokenId>>,
    next_seq: u64,
    next_unique_token: TokenId,
    prefixes: [Vec<TokenId>; 3],
}

impl Harness {
    fn new(num_blocks: usize, block_size: BlockSize) -> Self {
        let cache =
            BlockManager::new(KvCacheConfig::new(num_blocks).with_block_size(block_size)).unwrap();
        Harness {
            cache,
            block_size: block_size.tokens(),
            slots: vec![None; num_blocks * block_size.tokens()],
            computed_prefixes: BTreeSet::new(),
            next_seq: 0,
            next_unique_token: 1_000_000,
            prefixes: [
                (0..70).collect(),
                (0..70).map(|t| if t < 20 { t } else { 500 + t }).collect(),
                (0..70).map(|t| 2000 + t % 3).collect(),
            ],
        }
    }

    fn pick(&self, pick: usize) -> Option<SeqId> {
        let live: Vec<SeqId> = self.cache.sequence_ids().collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    }

    fn slot(&self, seq: SeqId, position: usize) -> usize {
        let table = self.cache.block_table(seq).unwrap();
        table[position / self.block_size].index() * self.block_size + position % self.block_size
    }

    /// Reserves and computes `num_tokens` tokens of `seq`, like one engine step.
    fn compute(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), KvCacheError> {
        let before = self.snapshot();
        let copies = match self.cache.reserve_slots(seq, num_tokens) {
            Ok(copies) => copies,
            Err(error) => {
                assert_eq!(self.snapshot(), before, "failed reserve changed state");
                return Err(error);
            }
        };
        for copy in copies {
            for offset in 0..self.block_size {
                self.slots[copy.dst.index() * self.block_size + offset] =
                    self.slots[copy.src.index() * self.block_size + offset];
            }
        }
        let start = self.cache.num_computed_tokens(seq).unwrap();
        let token_ids = self.cache.token_ids(seq).unwrap().to_vec();
        for (position, &token) in token_ids.iter().enumerate().skip(start).take(num_tokens) {
            let slot = self.slot(seq, position);
            self.slots[slot] = Some((token, position));
        }
        self.cache.mark_computed(seq, num_tokens).unwrap();
        let computed = start + num_tokens;
        for end in (self.block_size..=computed).step_by(self.block_size) {
            self.computed_prefixes.insert(token_ids[..end].to_vec());
        }
        Ok(())
    }

    fn snapshot(&self) -> String {
        let tables: Vec<_> = self
            .cache
            .sequence_ids()
            .map(|seq| (seq, self.cache.block_table(seq).unwrap().to_vec()))
            .collect();
        format!("{:?} {:?}", self.cache.stats(), tables)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Allocate {
                prefix,
                prefix_len,
                tail_len,
            } => {
                let mut token_ids = self.prefixes[prefix][..prefix_len].to_vec();
                for _ in 0..tail_len {
                    token_ids.push(self.next_unique_token);
                    self.next_unique_token += 1;
                }
                if token_ids.is_empty() {
                    token_ids.push(7);
                }
                let seq = SeqId(self.next_seq);
                self.next_seq += 1;
                let before = self.cache.stats();
                match self.cache.allocate_sequence(seq, &token_ids) {
                    Ok(allocation) => {
                        let cached = allocation.num_cached_tokens;
                        let after = self.cache.stats();
                        assert_eq!(cached % self.block_size, 0);
                        assert!(cached < token_ids.len(), "the last token must be computed");
                        assert_eq!(
                            after.prefix_cache_hits - before.prefix_cache_hits,
                            cached as u64
                        );
                        assert_eq!(
                            after.prefix_cache_queries - before.prefix_cache_queries,
                            token_ids.len() as u64
                        );
                        if cached > 0 {
                            assert!(
                                self.computed_prefixes.contains(&token_ids[..cached]),
                                "hit on a prefix that was never computed"
                            );
                        }
                    }
                    Err(KvCacheError::OutOfBlocks { needed, free }) => {
                        assert!(needed > free);
                        assert_eq!(self.cache.stats(), before);
                    }
                    Err(other) => panic!("unexpected {other}"),
                }
            }
            Op::Compute { pick, num_tokens } => {
                if let Some(seq) = self.pick(pick) {
                    let remaining = self.cache.token_ids(seq).unwrap().len()
                        - self.cache.num_computed_tokens(seq).unwrap();
                    let _ = self.compute(seq, num_tokens.min(remaining));
                }
            }
            Op::Decode { pick, token } => {
                if let Some(seq) = self.pick(pick) {
                    self.cache.append_tokens(seq, &[token]).unwrap();
                    let remaining = self.cache.token_ids(seq).unwrap().len()
                        - self.cache.num_computed_tokens(seq).unwrap();
                    let _ = self.compute(seq, remaining);
                }
            }
            Op::Fork { pick } => {
                if let Some(parent) = self.pick(pick) {
                    let child = SeqId(self.next_seq);
                    self.next_seq += 1;
                    let free_before = self.cache.num_free_blocks();
                    self.cache.fork(parent, child).unwrap();
                    assert_eq!(
                        self.cache.num_free_blocks(),
                        free_before,
                        "fork copies nothing"
                    );
                }
            }
            Op::Free { pick } => {
                if let Some(seq) = self.pick(pick) {
                    self.cache.free_sequence(seq).unwrap();
                }
            }
        }
    }

    fn check(&self) {
        self.cache.verify().unwrap();
        let stats = self.cache.stats();
        let mut references: BTreeMap<u32, u32> = BTreeMap::new();
        for seq in self.cache.sequence_ids() {
            for block in self.cache.block_table(seq).unwrap() {
                *references.entry(block.0).or_default() += 1;
            }
        }
        let used = references.len();
        assert_eq!(
            used + stats.num_free_blocks,
            stats.num_blocks,
            "leaked or double-freed block"
        );
        for block in 0..stats.num_blocks as u32 {
            let block_id = kiln_kvcache::BlockId(block);
            let expected = references.get(&block).copied().unwrap_or(0);
            assert_eq!(
                self.cache.ref_count(block_id).unwrap(),
                expected,
                "{block_id}"
            );
        }
        assert!(stats.prefix_cache_hits <= stats.prefix_cache_queries);
        assert_eq!(stats.prefix_cache_hits % self.block_size as u64, 0);
        // Every computed token of every live sequence reads back its own KV.
        for seq in self.cache.sequence_ids() {
            let computed = self.cache.num_computed_tokens(seq).unwrap();
            let token_ids = self.cache.token_ids(seq).unwrap();
            for (position, &token) in token_ids.iter().enumerate().take(computed) {
                assert_eq!(
                    self.slots[self.slot(seq, position)],
                    Some((token, position)),
                    "{seq} position {position} reads wrong KV"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(
        num_blocks in 2..24usize,
        block_size in prop::sample::select(BlockSize::ALL.to_vec()),
        ops in prop::collection::vec(op_strategy(), 1..120),
    ) {
        let mut harness = Harness::new(num_blocks, block_size);
        for op in &ops {
            harness.apply(op);
            harness.check();
        }
        let live: Vec<SeqId> = harness.cache.sequence_ids().collect();
        for seq in live {
            harness.cache.free_sequence(seq).unwrap();
        }
        harness.check();
        prop_assert_eq!(harness.cache.num_free_blocks(), num_blocks);
    }
}
