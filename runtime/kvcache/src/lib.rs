//! Paged KV-cache block manager for kiln's serving runtime (host side, no GPU).
//!
//! The device KV cache is cut into fixed-size blocks of 8, 16 or 32 tokens. Each sequence has a
//! block table mapping its logical blocks to physical ones; the engine turns positions into
//! slots as `block_table[pos / block_size] * block_size + pos % block_size`.
//!
//! # Invariants ([`BlockManager::verify`] checks them all)
//! - Every block is exactly one of: **used** (reference count > 0), **free** (count 0, not
//!   hashed) or **evictable** (count 0, still hashed and findable). `used + free + evictable`
//!   equals the number of blocks; a block is never freed twice.
//! - A block's reference count equals the number of block tables that contain it; no table holds
//!   a block twice.
//! - Only full blocks whose KV has been written are hashed. The hash chains the parent block's
//!   hash with the block's token ids, so equal hashes mean equal prefixes; a lookup also compares
//!   the parent hash and tokens, so a 64-bit collision within a chain cannot return wrong KV.
//! - A new sequence reuses the longest cached prefix of full blocks but always leaves its last
//!   token to compute. Prefix-cache queries and hits are counted in tokens, hits in whole blocks.
//! - Freed hashed blocks stay findable until reused; plain free blocks are handed out first,
//!   then the least recently freed hashed block is evicted (a sequence's tail before its head).
//! - Tokens are only ever written into blocks the writing sequence owns alone:
//!   [`BlockManager::reserve_slots`] copies-on-write a shared block before it is written and
//!   returns the copies the engine must perform first. Hashed blocks are full and never written.
//! - Every operation that can run out of blocks checks first and changes nothing on failure.
//!
//! Iteration order is deterministic everywhere it matters (B-trees and queues; the hash index
//! is only used for lookups).

mod error;
mod hash;
mod manager;
mod pool;
mod sizing;
mod types;

pub use error::KvCacheError;
pub use hash::{chain_block_hash, BlockHash};
pub use manager::{Allocation, BlockManager, CacheStats, KvCacheConfig};
pub use sizing::{check_max_model_len_fits, num_blocks_for_memory, KvCacheShape};
pub use types::{BlockCopy, BlockId, BlockSize, SeqId, TokenId};
