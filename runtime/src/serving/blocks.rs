//! KV-cache block accounting for the scheduler: reference-counted blocks, and a prefix cache of
//! full blocks keyed by the hash of their tokens and of every token before them (vLLM's
//! automatic prefix caching). A block whose last user finished keeps its contents and its hash
//! until it is needed for something else, least recently freed first.

use std::collections::{BTreeMap, HashMap};

/// The hash of a full block: its tokens, chained with the hash of the blocks before it, so equal
/// hashes mean equal prefixes (up to 64-bit collisions).
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(8 + tokens.len() * 4);
    bytes.extend_from_slice(&parent.unwrap_or(0x6b69_6c6e).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// All blocks of the KV cache and who holds them.
#[derive(Debug)]
pub struct BlockPool {
    size: usize,
    refs: Vec<u32>,
    /// The content hash of a block registered in the prefix cache.
    hash_of: Vec<Option<u64>>,
    /// Prefix cache: hash → the block holding those tokens.
    cached: HashMap<u64, u32>,
    /// Unused blocks holding nothing worth keeping.
    empty: Vec<u32>,
    /// Unused blocks still in the prefix cache, by the time they were freed (oldest first).
    evictable: BTreeMap<u64, u32>,
    /// When each evictable block was freed (its key in `evictable`).
    freed_at: Vec<u64>,
    clock: u64,
}

impl BlockPool {
    /// `blocks` blocks of `size` token slots, all free.
    pub fn new(blocks: usize, size: usize) -> BlockPool {
        BlockPool {
            size,
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            cached: HashMap::new(),
            empty: (0..blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            freed_at: vec![0; blocks],
            clock: 0,
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.size
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that an allocation can take (unused, cached or not).
    pub fn free(&self) -> usize {
        self.empty.len() + self.evictable.len()
    }

    /// Blocks in use by some sequence.
    pub fn used(&self) -> usize {
        self.total() - self.free()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.size)
    }

    /// A fresh block (reference count 1), evicting the least recently freed cached block when no
    /// empty one is left; `None` when every block is in use.
    pub fn alloc(&mut self) -> Option<u32> {
        let b = match self.empty.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// The cached blocks holding the longest prefix of `hashes` (the chained hashes of a
    /// sequence's full blocks, in order).
    pub fn lookup(&self, hashes: &[u64]) -> Vec<u32> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// How many of `blocks` are unused now (taking them lowers [`free`](Self::free)).
    pub fn unused_among(&self, blocks: &[u32]) -> usize {
        blocks
            .iter()
            .filter(|&&b| self.refs[b as usize] == 0)
            .count()
    }

    /// Takes one more reference to a cached block.
    pub fn share(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.freed_at[i]);
        }
        self.refs[i] += 1;
    }

    /// Drops one reference; an unused block stays in the prefix cache if it was registered.
    pub fn release(&mut self, b: u32) {
        let i = b as usize;
        debug_assert!(self.refs[i] > 0, "block {b} released twice");
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.clock += 1;
                self.freed_at[i] = self.clock;
                self.evictable.insert(self.clock, b);
            } else {
                self.empty.push(b);
            }
        }
    }

    /// Records that block `b` (in use, full) holds the tokens whose chained hash is `hash`. If
    /// another block already holds them, that one stays the cached copy.
    pub fn register(&mut self, b: u32, hash: u64) {
        if self.hash_of[b as usize].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, b);
            self.hash_of[b as usize] = Some(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_shared_cached_and_evicted_oldest_first() {
        let mut p = BlockPool::new(3, 4);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        let ha = block_hash(None, &[1, 2, 3, 4]);
        let hb = block_hash(Some(ha), &[5, 6, 7, 8]);
        p.register(a, ha);
        p.register(b, hb);
        assert_eq!(p.lookup(&[ha, hb]), vec![a, b]);
        // A different first block changes every later hash.
        assert!(p.lookup(&[block_hash(None, &[9, 2, 3, 4])]).is_empty());
        p.share(a);
        p.release(a);
        p.release(a);
        p.release(b);
        assert_eq!(p.free(), 3);
        // Still cached after release; taking it back makes it used again.
        assert_eq!(p.lookup(&[ha, hb]), vec![a, b]);
        assert_eq!(p.unused_among(&[a, b]), 2);
        p.share(a);
        assert_eq!(p.free(), 2);
        // The empty block goes first, then the least recently freed cached one (b).
        let c = p.alloc().unwrap();
        assert!(c != a && c != b);
        assert_eq!(p.alloc(), Some(b));
        assert_eq!(p.lookup(&[ha, hb]), vec![a]);
        assert_eq!(p.alloc(), None);
    }
}
