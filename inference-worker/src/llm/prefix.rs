//! The prefix cache: the keys and values of sequences that finished, kept by their tokens,
//! so a new sequence whose prompt begins the same way (a conversation's next turn, a shared
//! system prompt) starts from a copy of them and reads only the rest of its prompt.
//!
//! Owns: which token runs are kept, the longest-prefix lookup, and eviction of the least
//! recently used under a byte bound. Must never: hand out keys and values for tokens other
//! than the ones they were computed for, or grow past its bound.

use super::model::KvCache;

/// Shorter matches are not worth a copy.
const MIN_MATCH: usize = 16;

struct Entry {
    /// The tokens whose keys and values `cache` holds, one position each.
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

/// What a lookup found.
pub struct Hit {
    /// Keys and values of the prompt's first `positions` tokens.
    pub cache: KvCache,
    pub positions: usize,
}

/// Counts for metrics, since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: usize,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    max_bytes: usize,
    /// Values per position per layer (`kv_heads · head_dim`), for the keys and the values.
    kv_dim: usize,
    tick: u64,
    stats: PrefixStats,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache of at most `max_bytes` of keys and values; 0 keeps nothing.
    pub fn new(max_bytes: usize, kv_dim: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_bytes,
            kv_dim,
            tick: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            bytes: self.entries.iter().map(|e| e.bytes).sum(),
            ..self.stats
        }
    }

    /// Keys and values for the longest kept start of `prompt`, leaving at least its last
    /// token to be read (its logits are the first a sequence needs).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        if self.max_bytes == 0 {
            return None;
        }
        self.tick += 1;
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let n = common_prefix(&e.tokens, prompt).min(limit);
                (n, e)
            })
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, e)) if n >= MIN_MATCH => {
                e.last_used = self.tick;
                self.stats.hits += 1;
                Some(Hit {
                    cache: e.cache.prefix(n, self.kv_dim),
                    positions: n,
                })
            }
            _ => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Keeps a sequence's keys and values for `tokens` (one position each). A run that an
    /// entry already holds is not kept twice; an entry the new run extends is replaced.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: KvCache) {
        if self.max_bytes == 0 || tokens.len() < MIN_MATCH {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.max_bytes {
            return;
        }
        self.tick += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            e.last_used = self.tick;
            return;
        }
        self.entries
            .retain(|e| !(e.tokens.len() < tokens.len() && tokens.starts_with(&e.tokens)));
        self.entries.push(Entry {
            tokens,
            cache,
            bytes,
            last_used: self.tick,
        });
        let mut total: usize = self.entries.iter().map(|e| e.bytes).sum();
        while total > self.max_bytes {
            let Some((oldest, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            total -= self.entries.swap_remove(oldest).bytes;
            self.stats.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache whose every value is its position, one value per position and layer.
    fn cache_of(positions: usize) -> KvCache {
        KvCache::from_positions(1, 1, positions)
    }

    #[test]
    fn the_longest_prefix_is_found_and_the_last_prompt_token_left_to_read() {
        let mut c = PrefixCache::new(1 << 20, 1);
        let a: Vec<u32> = (0..40).collect();
        c.insert(a.clone(), cache_of(40));
        // The same prompt again: all but its last token.
        let hit = c.lookup(&a).unwrap();
        assert_eq!(hit.positions, 39);
        assert_eq!(hit.cache, cache_of(39));
        // A longer prompt that starts the same: the whole entry.
        let longer: Vec<u32> = (0..60).collect();
        assert_eq!(c.lookup(&longer).unwrap().positions, 40);
        // Diverging after 20 tokens.
        let mut other = a.clone();
        other[20] = 999;
        assert_eq!(c.lookup(&other).unwrap().positions, 20);
        // Too short a match is a miss.
        let mut early = a.clone();
        early[5] = 999;
        assert!(c.lookup(&early).is_none());
        assert_eq!(
            c.stats(),
            PrefixStats {
                hits: 3,
                misses: 1,
                evictions: 0,
                bytes: cache_of(40).bytes()
            }
        );
    }

    #[test]
    fn extensions_replace_prefixes_and_the_bound_evicts_the_least_recently_used() {
        let one = cache_of(1).bytes();
        let mut c = PrefixCache::new(100 * one, 1);
        c.insert((0..30).collect(), cache_of(30));
        c.insert((0..50).collect(), cache_of(50));
        assert_eq!(c.entries.len(), 1, "an extension replaces its prefix");
        c.insert((0..20).collect(), cache_of(20));
        assert_eq!(c.entries.len(), 1, "a held prefix is not kept twice");
        c.insert((100..140).collect(), cache_of(40));
        assert_eq!(c.entries.len(), 2);
        // Touch the first, then add a third that does not fit with both.
        assert!(c.lookup(&(0..50).collect::<Vec<u32>>()).is_some());
        c.insert((200..230).collect(), cache_of(30));
        assert_eq!(c.stats().evictions, 1);
        assert!(c.stats().bytes <= 100 * one);
        assert!(
            c.lookup(&(100..140).collect::<Vec<u32>>()).is_none(),
            "the least recently used went"
        );
        assert!(c.lookup(&(0..50).collect::<Vec<u32>>()).is_some());
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        let mut c = PrefixCache::new(0, 1);
        c.insert((0..40).collect(), cache_of(40));
        assert!(c.lookup(&(0..40).collect::<Vec<u32>>()).is_none());
        assert_eq!(c.stats().bytes, 0);
    }
}
