//! Startup sizing: how many blocks fit in the device memory left for the KV cache, and the
//! check that the longest allowed sequence (`max_model_len`) fits into them.

use crate::error::KvCacheError;
use crate::types::BlockSize;

/// The model dimensions that fix how many bytes one token's keys and values take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    /// Transformer layers (each stores its own K and V).
    pub num_layers: usize,
    /// Key/value heads per layer (fewer than query heads under GQA).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Bytes per element of the cache dtype (2 for f16/bf16, 1 for FP8).
    pub dtype_bytes: usize,
}

impl KvCacheShape {
    /// Bytes of KV cache one token takes: layers x 2 (K and V) x kv_heads x head_dim x dtype bytes.
    pub fn bytes_per_token(&self) -> u64 {
        [
            self.num_layers,
            2,
            self.num_kv_heads,
            self.head_dim,
            self.dtype_bytes,
        ]
        .into_iter()
        .map(|factor| factor as u64)
        .product()
    }
}

/// Number of blocks that fit into `memory_fraction` of `free_memory_bytes`, each block holding
/// `block_size` tokens of `bytes_per_token` bytes. Zero when not even one block fits.
pub fn num_blocks_for_memory(
    free_memory_bytes: u64,
    memory_fraction: f64,
    bytes_per_token: u64,
    block_size: BlockSize,
) -> Result<usize, KvCacheError> {
    if !(memory_fraction > 0.0 && memory_fraction <= 1.0) {
        return Err(KvCacheError::InvalidMemoryFraction(memory_fraction));
    }
    if bytes_per_token == 0 {
        return Err(KvCacheError::ZeroBytesPerToken);
    }
    let usable_bytes = (free_memory_bytes as f64 * memory_fraction).floor() as u64;
    let bytes_per_block = bytes_per_token.saturating_mul(block_size.tokens() as u64);
    let num_blocks = usable_bytes / bytes_per_block;
    Ok(usize::try_from(num_blocks).unwrap_or(usize::MAX))
}

/// Refuses a cache of `num_blocks` blocks that cannot hold one sequence of `max_model_len`
/// tokens; the error names both token counts.
pub fn check_max_model_len_fits(
    max_model_len: usize,
    num_blocks: usize,
    block_size: BlockSize,
) -> Result<(), KvCacheError> {
    let tokens_available = num_blocks.saturating_mul(block_size.tokens());
    if max_model_len > tokens_available {
        return Err(KvCacheError::MaxModelLenDoesNotFit {
            tokens_needed: max_model_len,
            tokens_available,
            num_blocks,
            block_size: block_size.tokens(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_8B_BF16: KvCacheShape = KvCacheShape {
        num_layers: 32,
        num_kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
    };

    #[test]
    fn bytes_per_token_multiplies_all_dimensions() {
        assert_eq!(LLAMA_8B_BF16.bytes_per_token(), 32 * 2 * 8 * 128 * 2);
        assert_eq!(LLAMA_8B_BF16.bytes_per_token(), 131_072);
    }

    #[test]
    fn blocks_use_the_given_fraction_and_round_down() {
        let per_token = LLAMA_8B_BF16.bytes_per_token();
        let per_block = per_token * 16;
        // 10.5 blocks worth of memory, all usable: 10 blocks.
        let free = per_block * 21 / 2;
        assert_eq!(
            num_blocks_for_memory(free, 1.0, per_token, BlockSize::Tokens16),
            Ok(10)
        );
        // Half of 40 blocks worth of memory.
        assert_eq!(
            num_blocks_for_memory(per_block * 40, 0.5, per_token, BlockSize::Tokens16),
            Ok(20)
        );
        // The same memory in 32-token blocks gives half as many blocks.
        assert_eq!(
            num_blocks_for_memory(per_block * 40, 0.5, per_token, BlockSize::Tokens32),
            Ok(10)
        );
        assert_eq!(
            num_blocks_for_memory(per_block - 1, 1.0, per_token, BlockSize::Tokens16),
            Ok(0)
        );
    }

    #[test]
    fn bad_fraction_and_zero_bytes_are_refused() {
        for fraction in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(matches!(
                num_blocks_for_memory(1 << 30, fraction, 1024, BlockSize::Tokens16),
                Err(KvCacheError::InvalidMemoryFraction(_))
            ));
        }
        assert_eq!(
            num_blocks_for_memory(1 << 30, 0.9, 0, BlockSize::Tokens16),
            Err(KvCacheError::ZeroBytesPerToken)
        );
    }

    #[test]
    fn max_model_len_check_names_both_numbers() {
        assert_eq!(
            check_max_model_len_fits(8192, 512, BlockSize::Tokens16),
            Ok(())
        );
        let error = check_max_model_len_fits(8193, 512, BlockSize::Tokens16).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("8193"), "{message}");
        assert!(message.contains("8192"), "{message}");
        assert!(matches!(
            error,
            KvCacheError::MaxModelLenDoesNotFit {
                tokens_needed: 8193,
                tokens_available: 8192,
                ..
            }
        ));
    }
}
