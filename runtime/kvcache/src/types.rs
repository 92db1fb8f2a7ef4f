//! Small value types shared by the block manager and its callers: ids, block size, copy ops.

use std::fmt;

use crate::error::KvCacheError;

/// A token id as produced by the tokenizer.
pub type TokenId = u32;

/// Index of one physical KV-cache block (`0..num_blocks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The block's position in the pool, usable as an index into device buffers.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block{}", self.0)
    }
}

/// Identifies one sequence (one stream of tokens with its own block table).
///
/// The caller chooses the ids; the block manager only requires that live ids are unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq{}", self.0)
    }
}

/// Tokens per KV-cache block. Only the sizes paged-attention kernels are built for are allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockSize {
    /// 8 tokens a block.
    Tokens8,
    /// 16 tokens a block (the default).
    #[default]
    Tokens16,
    /// 32 tokens a block.
    Tokens32,
}

impl BlockSize {
    /// All allowed block sizes, smallest first.
    pub const ALL: [BlockSize; 3] = [BlockSize::Tokens8, BlockSize::Tokens16, BlockSize::Tokens32];

    /// Number of tokens one block holds.
    pub fn tokens(self) -> usize {
        match self {
            BlockSize::Tokens8 => 8,
            BlockSize::Tokens16 => 16,
            BlockSize::Tokens32 => 32,
        }
    }

    /// Number of blocks needed to hold `num_tokens` tokens (rounded up).
    pub fn blocks_for(self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.tokens())
    }
}

impl TryFrom<usize> for BlockSize {
    type Error = KvCacheError;

    fn try_from(tokens: usize) -> Result<Self, Self::Error> {
        match tokens {
            8 => Ok(BlockSize::Tokens8),
            16 => Ok(BlockSize::Tokens16),
            32 => Ok(BlockSize::Tokens32),
            other => Err(KvCacheError::InvalidBlockSize(other)),
        }
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.tokens())
    }
}

/// A whole-block copy the engine must perform before running the step's forward pass
/// (copy-on-write of a shared, partially filled block). Copies must run in list order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// Block whose contents are read.
    pub src: BlockId,
    /// Freshly allocated block that receives the contents.
    pub dst: BlockId,
}
