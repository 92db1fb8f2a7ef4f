//! Errors of the KV-cache crate: block exhaustion, misuse of sequence ids, startup sizing.

use thiserror::Error;

use crate::types::{BlockId, SeqId};

/// Everything that can go wrong in the block manager or the startup sizing helpers.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KvCacheError {
    /// A block size other than 8, 16 or 32 tokens was requested.
    #[error("block size {0} is not supported (use 8, 16 or 32 tokens)")]
    InvalidBlockSize(usize),
    /// The pool was configured with no blocks at all.
    #[error("the KV cache needs at least one block")]
    NoBlocks,
    /// Not enough free blocks for the operation; nothing was changed.
    #[error("out of KV-cache blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// Blocks the operation would take from the free pool.
        needed: usize,
        /// Blocks that were free (including evictable prefix-cached blocks).
        free: usize,
    },
    /// More blocks than block ids can address.
    #[error("{0} blocks is more than the cache can address")]
    InvalidBlockCount(usize),
    /// The sequence id is not allocated.
    #[error("{0} is not allocated in the KV cache")]
    UnknownSequence(SeqId),
    /// The sequence id is already allocated.
    #[error("{0} is already allocated in the KV cache")]
    SequenceExists(SeqId),
    /// A sequence must start with at least one token.
    #[error("{0} has no tokens")]
    EmptySequence(SeqId),
    /// Slots were requested, or tokens marked computed, past the tokens the sequence holds.
    #[error("{seq}: tokens up to {requested} requested but the sequence holds only {known}")]
    BeyondKnownTokens {
        /// The sequence.
        seq: SeqId,
        /// One past the last token position the call needs.
        requested: usize,
        /// Tokens the sequence holds.
        known: usize,
    },
    /// Tokens were marked computed before slots were reserved for them.
    #[error(
        "{seq}: tokens up to {requested} marked computed but slots exist only up to {reserved}"
    )]
    SlotsNotReserved {
        /// The sequence.
        seq: SeqId,
        /// One past the last position marked computed.
        requested: usize,
        /// Token slots the sequence's block table covers.
        reserved: usize,
    },
    /// A block id outside the pool.
    #[error("{0} is outside the KV-cache pool")]
    UnknownBlock(BlockId),
    /// The memory fraction given to the cache must lie in (0, 1].
    #[error("KV-cache memory fraction {0} must be greater than 0 and at most 1")]
    InvalidMemoryFraction(f64),
    /// Per-token KV bytes must be positive.
    #[error(
        "KV bytes per token must be positive (layers x 2 x kv_heads x head_dim x dtype bytes)"
    )]
    ZeroBytesPerToken,
    /// `max_model_len` tokens do not fit into the cache sized at startup.
    #[error(
        "max_model_len needs {tokens_needed} tokens of KV cache but only {tokens_available} fit \
         ({num_blocks} blocks of {block_size} tokens); lower max_model_len or give the cache more memory"
    )]
    MaxModelLenDoesNotFit {
        /// Tokens one sequence of `max_model_len` needs.
        tokens_needed: usize,
        /// Tokens the whole cache holds.
        tokens_available: usize,
        /// Blocks in the cache.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// An internal consistency check failed (see [`crate::BlockManager::verify`]).
    #[error("KV-cache invariant violated: {0}")]
    InvariantViolated(String),
}
