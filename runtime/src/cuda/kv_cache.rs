//! Paged KV cache bookkeeping on the host: fixed-size blocks of `BLOCK` token slots, a free
//! list, and each sequence's block table (logical block → physical block), as in vLLM.

/// Tokens per cache block (the kernels are specialized for it).
pub const BLOCK: usize = 16;

/// Block allocation for all sequences.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

/// One sequence's cache: its blocks and how many tokens they hold.
#[derive(Debug, Default, Clone)]
pub struct SeqCache {
    /// Physical blocks, in logical order.
    pub blocks: Vec<u32>,
    /// Tokens cached.
    pub len: usize,
}

impl BlockAllocator {
    /// An allocator over `total` blocks.
    pub fn new(total: usize) -> BlockAllocator {
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    /// Blocks not in use.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// All blocks.
    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Grows `seq` to hold `new_len` tokens; `Err` (nothing changed) when blocks run out.
    pub fn reserve(&mut self, seq: &mut SeqCache, new_len: usize) -> Result<(), String> {
        let need = new_len.div_ceil(BLOCK).saturating_sub(seq.blocks.len());
        if need > self.free.len() {
            return Err(format!(
                "KV cache full: {new_len} tokens need {need} more blocks of {BLOCK}, {} free of {}",
                self.free.len(),
                self.total
            ));
        }
        for _ in 0..need {
            seq.blocks.push(self.free.pop().expect("checked"));
        }
        Ok(())
    }

    /// Gives back the blocks of `seq` after its first `keep` (undoing a [`reserve`](Self::reserve)).
    pub fn shrink(&mut self, seq: &mut SeqCache, keep: usize) {
        if seq.blocks.len() > keep {
            self.free.extend(seq.blocks.drain(keep..));
        }
    }

    /// Returns a sequence's blocks to the free list.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.append(&mut seq.blocks);
        seq.len = 0;
    }
}

/// Cache slot (physical block · BLOCK + offset) of token position `pos` of a sequence.
pub fn slot(seq: &SeqCache, pos: usize) -> i32 {
    (seq.blocks[pos / BLOCK] as usize * BLOCK + pos % BLOCK) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_and_slots() {
        let mut a = BlockAllocator::new(4);
        let mut s = SeqCache::default();
        a.reserve(&mut s, 17).unwrap();
        assert_eq!(s.blocks.len(), 2);
        assert_eq!(slot(&s, 16), (s.blocks[1] as usize * BLOCK) as i32);
        let mut t = SeqCache::default();
        assert!(a
            .reserve(&mut t, 3 * BLOCK)
            .unwrap_err()
            .contains("KV cache full"));
        assert!(t.blocks.is_empty());
        a.release(&mut s);
        assert_eq!(a.free_blocks(), 4);
    }
}
