//! `rust_bpe`: a byte-level BPE tokenizer trainer with Python bindings.
//!
//! Training pipeline:
//!
//! 1. **Streaming pre-tokenisation.** Strings are pulled from a Python iterator
//!    in batches of `buffer_size`. Each batch is split with the regex (GPT-4
//!    style by default) in parallel with rayon, and the chunk frequencies are
//!    folded into one global `chunk -> count` table. Only one batch of raw
//!    text is alive at a time, so memory is bounded by the batch plus the
//!    number of *unique* chunks.
//! 2. **Initial pair counts**, computed in parallel over the unique chunks
//!    ("words", stored as `u32` token ids in one flat arena).
//! 3. **Incremental merge loop.** A lazy max-heap keyed by pair count holds
//!    candidate pairs; every pair keeps a list of the words that may contain
//!    it. Applying a merge only touches those words, and the pair counts are
//!    updated by exact per-word deltas. Stale heap entries are detected on pop
//!    (stored count != current count) and re-queued with the current count.
//!
//! # Tie-break rule
//!
//! Every step merges the pair with the **highest total count**; among pairs
//! with equal counts it takes the **smallest pair `(left_id, right_id)` in
//! lexicographic order of the token ids** (compare `left_id` first, then
//! `right_id`; raw bytes have ids 0..=255 and the i-th merge creates id
//! 256 + i). This is the rule used by nanochat's `rustbpe`, so both trainers
//! learn identical merges on identical input. The result depends only on the
//! chunk counts, never on thread count or iteration order.
//!
//! Training stops early (with fewer merges than asked for) when no pair occurs
//! any more, i.e. every chunk has become a single token.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use fancy_regex::Regex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyIterator, PyString};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

mod split;
pub use split::FastSplit;

/// nanochat's split pattern: GPT-4's `cl100k_base` regex, except that numbers
/// are split into runs of at most two digits (`\p{N}{1,2}`).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// A pair of token ids packed as `(left << 32) | right`. Ordering of the
/// packed value equals lexicographic ordering of `(left, right)`.
type PairKey = u64;

#[inline]
fn pack(a: u32, b: u32) -> PairKey {
    ((a as u64) << 32) | b as u64
}

#[inline]
fn unpack(k: PairKey) -> (u32, u32) {
    ((k >> 32) as u32, k as u32)
}

// ---------------------------------------------------------------------------
// Errors (kept Python-free so the core can run without the GIL).
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub enum BpeError {
    InvalidArgument(String),
    Regex(String),
}

impl From<BpeError> for PyErr {
    fn from(e: BpeError) -> PyErr {
        match e {
            BpeError::InvalidArgument(m) => PyValueError::new_err(m),
            BpeError::Regex(m) => PyRuntimeError::new_err(m),
        }
    }
}

/// Splits text into chunks: a hand-written matcher for the two GPT-4 style
/// patterns (same output as the regex, several times faster), `fancy-regex`
/// for any other pattern.
pub struct Splitter {
    regex: Regex,
    fast: Option<FastSplit>,
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, BpeError> {
        Ok(Splitter { regex: compile_pattern(pattern)?, fast: FastSplit::for_pattern(pattern) })
    }

    /// Same as `new` but never uses the fast path (for testing).
    pub fn regex_only(pattern: &str) -> Result<Self, BpeError> {
        Ok(Splitter { regex: compile_pattern(pattern)?, fast: None })
    }

    /// Call `f` on every non-empty chunk of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), BpeError> {
        if let Some(fast) = &self.fast {
            fast.for_each(text, f);
            return Ok(());
        }
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| BpeError::Regex(format!("regex matching failed: {e}")))?;
            if !m.as_str().is_empty() {
                f(m.as_str());
            }
        }
        Ok(())
    }
}

pub fn compile_pattern(pattern: &str) -> Result<Regex, BpeError> {
    if pattern.is_empty() {
        return Err(BpeError::InvalidArgument(
            "invalid regex pattern: the pattern is empty".to_string(),
        ));
    }
    Regex::new(pattern)
        .map_err(|e| BpeError::InvalidArgument(format!("invalid regex pattern {pattern:?}: {e}")))
}

// ---------------------------------------------------------------------------
// Stage 1: chunk counting.
// ---------------------------------------------------------------------------

/// Global table of pre-tokenised chunks and how often each occurred.
#[derive(Default)]
pub struct ChunkCounter {
    counts: FxHashMap<Box<str>, u64>,
    total_bytes: u64,
}

impl ChunkCounter {
    /// Split every text of `batch` with `re` (in parallel) and add the chunk
    /// frequencies to the table.
    pub fn add_batch<S: AsRef<str> + Sync>(&mut self, re: &Splitter, batch: &[S]) -> Result<(), BpeError> {
        type Local<'a> = (FxHashMap<&'a str, u64>, Option<BpeError>);
        let (local, err): Local = batch
            .par_iter()
            .fold(
                || (FxHashMap::default(), None),
                |(mut map, mut err): Local, text| {
                    if err.is_none() {
                        if let Err(e) = re.for_each(text.as_ref(), |piece| *map.entry(piece).or_insert(0) += 1) {
                            err = Some(e);
                        }
                    }
                    (map, err)
                },
            )
            .reduce(
                || (FxHashMap::default(), None),
                |(a, ea), (b, eb)| {
                    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                    for (k, v) in small {
                        *big.entry(k).or_insert(0) += v;
                    }
                    (big, ea.or(eb))
                },
            );
        if let Some(e) = err {
            return Err(e);
        }
        self.total_bytes += batch.iter().map(|s| s.as_ref().len() as u64).sum::<u64>();
        self.counts.reserve(local.len() / 4);
        for (k, v) in local {
            if let Some(c) = self.counts.get_mut(k) {
                *c += v;
            } else {
                self.counts.insert(k.into(), v);
            }
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn num_unique(&self) -> usize {
        self.counts.len()
    }
}

// ---------------------------------------------------------------------------
// Stage 2 + 3: BPE on the unique chunks.
// ---------------------------------------------------------------------------

/// Unique chunks as token-id sequences in one flat arena. Merging shrinks a
/// word in place; `len[w]` is its current length.
struct Words {
    data: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    fn from_counter(counter: ChunkCounter) -> Self {
        let n = counter.counts.len();
        let mut items: Vec<(Box<str>, u64)> = counter.counts.into_iter().collect();
        // Deterministic layout (not needed for correctness, keeps runs reproducible).
        items.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let total: usize = items.iter().map(|(s, _)| s.len()).sum();
        let mut data = Vec::with_capacity(total);
        let mut start = Vec::with_capacity(n);
        let mut len = Vec::with_capacity(n);
        let mut count = Vec::with_capacity(n);
        for (s, c) in items {
            start.push(data.len());
            len.push(s.len() as u32);
            count.push(c as i64);
            data.extend(s.as_bytes().iter().map(|&b| b as u32));
        }
        Words { data, start, len, count }
    }

    #[inline]
    fn get(&self, w: usize) -> &[u32] {
        &self.data[self.start[w]..self.start[w] + self.len[w] as usize]
    }
}

/// Initial pair counts and, for each pair, the words containing it.
fn initial_pairs(words: &Words) -> (FxHashMap<PairKey, i64>, FxHashMap<PairKey, Vec<u32>>) {
    let n = words.len.len();
    let chunk = (n / (rayon::current_num_threads() * 8)).max(4096);
    let parts: Vec<(FxHashMap<PairKey, i64>, FxHashMap<PairKey, Vec<u32>>)> = (0..n)
        .into_par_iter()
        .with_min_len(chunk)
        .fold(
            || (FxHashMap::default(), FxHashMap::default()),
            |(mut pc, mut pos): (FxHashMap<PairKey, i64>, FxHashMap<PairKey, Vec<u32>>), w| {
                let ids = words.get(w);
                let c = words.count[w];
                for win in ids.windows(2) {
                    let k = pack(win[0], win[1]);
                    *pc.entry(k).or_insert(0) += c;
                    let v = pos.entry(k).or_default();
                    if v.last() != Some(&(w as u32)) {
                        v.push(w as u32);
                    }
                }
                (pc, pos)
            },
        )
        .collect();
    let mut iter = parts.into_iter();
    let (mut pc, mut pos) = iter.next().unwrap_or_default();
    for (pc2, pos2) in iter {
        for (k, v) in pc2 {
            *pc.entry(k).or_insert(0) += v;
        }
        for (k, v) in pos2 {
            pos.entry(k).or_default().extend(v);
        }
    }
    (pc, pos)
}

/// Learn up to `num_merges` merges from the counted chunks. Returns the merged
/// pairs in order; the i-th pair produces token id `256 + i`.
pub fn learn_merges(counter: ChunkCounter, num_merges: u32) -> Vec<(u32, u32)> {
    let mut words = Words::from_counter(counter);
    let (mut pair_counts, mut where_) = initial_pairs(&words);

    // Max-heap on (count, smallest pair first): `Reverse(key)` makes the
    // smaller packed pair compare greater among equal counts.
    let mut heap: BinaryHeap<(i64, Reverse<PairKey>)> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&k, &c)| (c, Reverse(k)))
        .collect();

    let mut merges: Vec<(u32, u32)> = Vec::with_capacity(num_merges as usize);
    // visited[w] == stamp  <=>  word w already processed for the current merge.
    let mut visited: Vec<u32> = vec![0; words.len.len()];
    let mut new_pairs: Vec<PairKey> = Vec::new();

    while (merges.len() as u32) < num_merges {
        let Some((c, Reverse(key))) = heap.pop() else { break };
        let current = pair_counts.get(&key).copied().unwrap_or(0);
        if current != c {
            if current > 0 {
                heap.push((current, Reverse(key)));
            }
            continue;
        }
        if c <= 0 {
            break;
        }
        let (a, b) = unpack(key);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));
        let stamp = merges.len() as u32;

        let occurrences = where_.remove(&key).unwrap_or_default();
        new_pairs.clear();
        for &w in &occurrences {
            let wi = w as usize;
            if visited[wi] == stamp {
                continue;
            }
            visited[wi] = stamp;
            let cnt = words.count[wi];
            let s = words.start[wi];
            let n = words.len[wi] as usize;
            let ids = &mut words.data[s..s + n];
            // In-place merge with exact pair-count deltas.
            let mut r = 0usize;
            let mut wpos = 0usize;
            let mut changed = false;
            while r < n {
                if r + 1 < n && ids[r] == a && ids[r + 1] == b {
                    changed = true;
                    if wpos > 0 {
                        let x = ids[wpos - 1];
                        *pair_counts.entry(pack(x, a)).or_insert(0) -= cnt;
                        let nk = pack(x, new_id);
                        *pair_counts.entry(nk).or_insert(0) += cnt;
                        record_new(&mut where_, &mut new_pairs, nk, w);
                    }
                    if r + 2 < n {
                        let y = ids[r + 2];
                        *pair_counts.entry(pack(b, y)).or_insert(0) -= cnt;
                        let nk = pack(new_id, y);
                        *pair_counts.entry(nk).or_insert(0) += cnt;
                        record_new(&mut where_, &mut new_pairs, nk, w);
                    }
                    ids[wpos] = new_id;
                    wpos += 1;
                    r += 2;
                } else {
                    ids[wpos] = ids[r];
                    wpos += 1;
                    r += 1;
                }
            }
            if changed {
                words.len[wi] = wpos as u32;
            }
        }
        // Every occurrence of (a, b) is gone now.
        pair_counts.remove(&key);
        for &nk in &new_pairs {
            let c = pair_counts.get(&nk).copied().unwrap_or(0);
            if c > 0 {
                heap.push((c, Reverse(nk)));
            }
        }
    }
    merges
}

#[inline]
fn record_new(where_: &mut FxHashMap<PairKey, Vec<u32>>, new_pairs: &mut Vec<PairKey>, k: PairKey, w: u32) {
    let v = where_.entry(k).or_default();
    if v.is_empty() {
        new_pairs.push(k);
    }
    if v.last() != Some(&w) {
        v.push(w);
    }
}

// ---------------------------------------------------------------------------
// Encoding (tiktoken-compatible) and vocabulary export.
// ---------------------------------------------------------------------------

/// Bytes of every token id, given the ordered merges.
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = out[a as usize].clone();
        t.extend_from_slice(&out[b as usize]);
        out.push(t);
    }
    out
}

/// Byte-pair encode one chunk exactly like tiktoken: a chunk that is itself a
/// token maps to that token; otherwise start from single bytes and repeatedly
/// join the adjacent parts whose concatenation has the lowest rank (leftmost
/// on ties) until no adjacent concatenation is a token.
fn encode_chunk(encoder: &FxHashMap<Vec<u8>, u32>, piece: &[u8], out: &mut Vec<u32>) {
    if let Some(&t) = encoder.get(piece) {
        out.push(t);
        return;
    }
    // bounds[i]..bounds[i+1] is part i.
    let mut bounds: Vec<usize> = (0..=piece.len()).collect();
    let rank_of = |bounds: &[usize], i: usize| -> u32 {
        if i + 2 < bounds.len() {
            encoder.get(&piece[bounds[i]..bounds[i + 2]]).copied().unwrap_or(u32::MAX)
        } else {
            u32::MAX
        }
    };
    let mut ranks: Vec<u32> = (0..bounds.len() - 1).map(|i| rank_of(&bounds, i)).collect();
    loop {
        let mut best = u32::MAX;
        let mut at = usize::MAX;
        for (i, &r) in ranks.iter().enumerate() {
            if r < best {
                best = r;
                at = i;
            }
        }
        if best == u32::MAX {
            break;
        }
        bounds.remove(at + 1);
        ranks.remove(at + 1);
        ranks[at] = rank_of(&bounds, at);
        if at > 0 {
            ranks[at - 1] = rank_of(&bounds, at - 1);
        }
    }
    for i in 0..bounds.len() - 1 {
        out.push(encoder[&piece[bounds[i]..bounds[i + 1]]]);
    }
}

// ---------------------------------------------------------------------------
// Python bindings.
// ---------------------------------------------------------------------------

/// Byte-level BPE tokenizer trainer (GPT-4 style regex pre-split).
///
/// Usage:
///
/// ```python
/// tok = rust_bpe.Tokenizer()
/// tok.train_from_iterator(texts, vocab_size=4096)
/// ranks = dict(tok.get_mergeable_ranks())
/// enc = tiktoken.Encoding("x", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})
/// ```
///
/// Tie-break rule: each merge picks the adjacent pair with the highest count;
/// equal counts are resolved by taking the smallest (left_id, right_id) pair
/// in lexicographic order of token ids (bytes are ids 0..255, the i-th merge
/// creates id 256+i). This matches nanochat's ``rustbpe`` exactly, and the
/// result does not depend on the number of threads.
#[pyclass(module = "rust_bpe")]
pub struct Tokenizer {
    pattern: String,
    regex: Option<Splitter>,
    merges: Vec<(u32, u32)>,
    encoder: FxHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn rebuild_encoder(&mut self) {
        self.encoder = token_bytes(&self.merges)
            .into_iter()
            .enumerate()
            .map(|(i, b)| (b, i as u32))
            .collect();
    }

    fn regex(&mut self) -> PyResult<&Splitter> {
        if self.regex.is_none() {
            self.regex = Some(Splitter::new(&self.pattern)?);
        }
        Ok(self.regex.as_ref().unwrap())
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let mut t = Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            regex: None,
            merges: Vec::new(),
            encoder: FxHashMap::default(),
        };
        t.rebuild_encoder();
        t
    }

    /// train_from_iterator(iterator, vocab_size, buffer_size=8192, pattern=None)
    ///
    /// Train byte-level BPE on the strings yielded by ``iterator``.
    ///
    /// The iterator is consumed in batches of ``buffer_size`` strings; each
    /// batch is split with ``pattern`` (default: nanochat's GPT-4 style
    /// SPLIT_PATTERN with ``\p{N}{1,2}``) and counted in parallel with the GIL
    /// released. ``vocab_size`` counts the 256 byte tokens plus the merges
    /// (special tokens are not included), so it must be >= 256. Fewer merges
    /// are learned if the text runs out of pairs.
    ///
    /// Tie-break: highest pair count first; on equal counts, the smallest
    /// (left_id, right_id) pair in lexicographic order. Same rule as nanochat's
    /// rustbpe; results are independent of the thread count.
    ///
    /// A lone surrogate in a string counts as U+FFFD (what tiktoken encodes it
    /// as). Raises ValueError for vocab_size < 256, buffer_size < 1, an invalid or
    /// empty pattern, or an iterator that yields no text at all; TypeError if
    /// ``iterator`` is not iterable or yields a non-str item; RuntimeError if
    /// the regex engine gives up on an input (backtracking limit).
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be >= 256 (the 256 byte tokens), got {vocab_size}"
            )));
        }
        if vocab_size > u32::MAX as i64 / 2 {
            return Err(PyValueError::new_err(format!("vocab_size is too large: {vocab_size}")));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be >= 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let re = Splitter::new(&pattern)?;
        let mut it = PyIterator::from_object(iterator).map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;

        let buffer_size = buffer_size as usize;
        let mut counter = ChunkCounter::default();
        let mut buf: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
        let mut n_items: u64 = 0;
        let mut exhausted = false;
        while !exhausted {
            buf.clear();
            while buf.len() < buffer_size {
                match it.next() {
                    None => {
                        exhausted = true;
                        break;
                    }
                    Some(item) => {
                        let item = item?;
                        let s = item.downcast::<PyString>().map_err(|_| {
                            PyTypeError::new_err(format!(
                                "train_from_iterator: item {n_items} is of type {}, expected str",
                                type_name(&item)
                            ))
                        })?;
                        buf.push(match s.to_str() {
                            Ok(text) => text.to_owned(),
                            // lone surrogates (e.g. from JSON escapes): each becomes U+FFFD, as in tiktoken's encode
                            Err(_) => s
                                .call_method1("encode", ("utf-16", "surrogatepass"))?
                                .call_method1("decode", ("utf-16", "replace"))?
                                .extract::<String>()?,
                        });
                        n_items += 1;
                    }
                }
            }
            if buf.is_empty() {
                break;
            }
            py.allow_threads(|| counter.add_batch(&re, &buf))?;
        }
        drop(buf);
        if counter.total_bytes() == 0 {
            return Err(PyValueError::new_err(if n_items == 0 {
                "train_from_iterator: the iterator yielded no text (it was empty)".to_string()
            } else {
                format!("train_from_iterator: all {n_items} strings were empty, nothing to train on")
            }));
        }

        let num_merges = (vocab_size - 256) as u32;
        let merges = py.allow_threads(|| learn_merges(counter, num_merges));
        self.pattern = pattern;
        self.regex = Some(re);
        self.merges = merges;
        self.rebuild_encoder();
        Ok(())
    }

    /// The regex pattern used to split text into chunks.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Number of tokens (256 bytes + learned merges), special tokens excluded.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// The learned merges as ``[((left_id, right_id), new_id), ...]`` in order.
    fn get_merges(&self) -> Vec<((u32, u32), u32)> {
        self.merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect()
    }

    /// ``[(token_bytes, rank), ...]`` sorted by rank; ``dict(...)`` of it is a
    /// valid ``mergeable_ranks`` for ``tiktoken.Encoding``.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, pyo3::types::PyBytes>, u32)> {
        token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(i, b)| (pyo3::types::PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// Encode ``text`` to token ids (same result as tiktoken with these ranks).
    fn encode(&mut self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        self.regex()?;
        let re = self.regex.as_ref().unwrap();
        let encoder = &self.encoder;
        py.allow_threads(|| {
            let mut out = Vec::with_capacity(text.len() / 3);
            re.for_each(text, |piece| encode_chunk(encoder, piece.as_bytes(), &mut out))?;
            Ok::<_, BpeError>(out)
        })
        .map_err(Into::into)
    }
}

/// _split(text, pattern=None, regex_only=False) -> list[str]
///
/// Pre-tokenise ``text`` the way training does (testing aid). With
/// ``regex_only=True`` the fast built-in matcher is bypassed and fancy-regex
/// is used for every pattern.
#[pyfunction]
#[pyo3(signature = (text, pattern=None, regex_only=false))]
fn _split(text: &str, pattern: Option<&str>, regex_only: bool) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
    let sp = if regex_only { Splitter::regex_only(pattern)? } else { Splitter::new(pattern)? };
    let mut out = Vec::new();
    sp.for_each(text, |p| out.push(p.to_string()))?;
    Ok(out)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<unknown>".to_string())
}

#[pymodule]
fn rust_bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add_function(wrap_pyfunction!(_split, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(texts: &[&str], vocab: u32) -> Vec<(u32, u32)> {
        let re = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut c = ChunkCounter::default();
        c.add_batch(&re, texts).unwrap();
        learn_merges(c, vocab - 256)
    }

    #[test]
    fn first_merge_is_most_frequent_pair() {
        let m = train(&["aaab aaab ab"], 257);
        // pairs: (a,a)x4, (a,b)x3, ...
        assert_eq!(m, vec![(b'a' as u32, b'a' as u32)]);
    }

    #[test]
    fn tie_breaks_on_smallest_pair() {
        let m = train(&["dc", "ba"], 258);
        assert_eq!(m[0], (b'b' as u32, b'a' as u32));
        assert_eq!(m[1], (b'd' as u32, b'c' as u32));
    }

    #[test]
    fn stops_when_no_pairs_left() {
        let m = train(&["ab"], 1000);
        assert_eq!(m.len(), 1);
    }
}
