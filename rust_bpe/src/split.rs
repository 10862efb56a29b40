//! Hand-written matcher for the GPT-4 style split pattern.
//!
//! The pattern (with `D` = 2 for nanochat's SPLIT_PATTERN, 3 for cl100k):
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re) | [^\r\n\p{L}\p{N}]?+\p{L}+ | \p{N}{1,D}
//! | ?[^\s\p{L}\p{N}]++[\r\n]* | \s*[\r\n] | \s+(?!\S) | \s+
//! ```
//!
//! matches at every position of any string (each character is a letter, a
//! number, white space or "other"), so `find_iter` yields a contiguous
//! partition of the text. `next_end` reproduces, alternative by alternative,
//! what a backtracking engine with leftmost-first alternation does at one
//! position. The character classes are taken from `regex-syntax` (the Unicode
//! tables that `fancy-regex` itself compiles the pattern with), so both paths
//! agree on every code point; the test-suite checks this against
//! `fancy-regex` on random Unicode text.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, Hir, HirKind};

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

struct Classes {
    /// Class bits of every code point below 0x10000.
    bmp: Vec<u8>,
    /// Sorted, non-overlapping ranges above the BMP: (lo, hi, bits).
    astral: Vec<(u32, u32, u8)>,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir: Hir = regex_syntax::parse(pattern).expect("built-in class must parse");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        _ => panic!("expected a Unicode class for {pattern}"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral_pts: Vec<(u32, u32, u8)> = Vec::new();
        for (pat, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in class_ranges(pat) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral_pts.push((lo.max(0x10000), hi, bit));
                }
            }
        }
        astral_pts.sort_unstable();
        Classes { bmp, astral: astral_pts }
    })
}

#[inline]
fn class_of(c: char, t: &Classes) -> u8 {
    let cp = c as u32;
    if cp < 0x10000 {
        t.bmp[cp as usize]
    } else {
        // The classes are disjoint, so the ranges are too: only the range
        // with the largest start <= cp can contain cp.
        let idx = t.astral.partition_point(|r| r.0 <= cp);
        match idx.checked_sub(1).map(|k| t.astral[k]) {
            Some((_, hi, bits)) if cp <= hi => bits,
            _ => 0,
        }
    }
}

/// Fast splitter for the two GPT-4 style patterns.
pub struct FastSplit {
    max_digits: usize,
}

impl FastSplit {
    /// `Some` when `pattern` is exactly nanochat's SPLIT_PATTERN or GPT-4's.
    pub fn for_pattern(pattern: &str) -> Option<FastSplit> {
        const HEAD: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,";
        const TAIL: &str = r"}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
        let mid = pattern.strip_prefix(HEAD)?.strip_suffix(TAIL)?;
        let max_digits = match mid {
            "2" => 2,
            "3" => 3,
            _ => return None,
        };
        classes();
        Some(FastSplit { max_digits })
    }

    /// Call `f` with every chunk of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) {
        let t = classes();
        let mut i = 0;
        while i < text.len() {
            let end = self.next_end(text, i, t);
            f(&text[i..end]);
            i = end;
        }
    }

    /// End (byte offset) of the match that starts at byte `i` (< len).
    fn next_end(&self, s: &str, i: usize, t: &Classes) -> usize {
        let b = s.as_bytes();
        let n = b.len();
        let (c0, l0) = decode(s, i);
        let k0 = class_of(c0, t);

        // 1. '(?i:[sdmt]|ll|ve|re)
        if c0 == '\'' && i + 1 < n {
            let (c1, l1) = decode(s, i + 1);
            match c1 {
                's' | 'S' | 'd' | 'D' | 'm' | 'M' | 't' | 'T' | '\u{17F}' => return i + 1 + l1,
                'l' | 'L' | 'v' | 'V' | 'r' | 'R' if i + 1 + l1 < n => {
                    let c2 = b[i + 1 + l1];
                    let ok = match c1 {
                        'l' | 'L' => c2 == b'l' || c2 == b'L',
                        _ => c2 == b'e' || c2 == b'E',
                    };
                    if ok {
                        return i + 2 + l1;
                    }
                }
                _ => {}
            }
        }

        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        if k0 & LETTER != 0 {
            return letters_end(s, i + l0, t);
        }
        if k0 & NUMBER == 0 && c0 != '\r' && c0 != '\n' && i + l0 < n {
            let (c1, _) = decode(s, i + l0);
            if class_of(c1, t) & LETTER != 0 {
                return letters_end(s, i + l0, t);
            }
        }

        // 3. \p{N}{1,D}
        if k0 & NUMBER != 0 {
            let mut j = i + l0;
            let mut count = 1;
            while count < self.max_digits && j < n {
                let (c, l) = decode(s, j);
                if class_of(c, t) & NUMBER == 0 {
                    break;
                }
                j += l;
                count += 1;
            }
            return j;
        }

        // 4.  ?[^\s\p{L}\p{N}]++[\r\n]*
        let other = |c: char| class_of(c, t) & (LETTER | NUMBER | SPACE) == 0;
        let punct_start = if other(c0) {
            Some(i)
        } else if c0 == ' ' && i + 1 < n && other(decode(s, i + 1).0) {
            Some(i + 1)
        } else {
            None
        };
        if let Some(p) = punct_start {
            let mut j = p;
            while j < n {
                let (c, l) = decode(s, j);
                if !other(c) {
                    break;
                }
                j += l;
            }
            while j < n && (b[j] == b'\r' || b[j] == b'\n') {
                j += 1;
            }
            return j;
        }

        // Only white space is left: c0 is \s.
        debug_assert!(k0 & SPACE != 0);
        let mut j = i;
        let mut last_nl_end = None; // end of the last \r or \n in the run
        let mut last_start = i; // start of the last white-space char in the run
        while j < n {
            let (c, l) = decode(s, j);
            if class_of(c, t) & SPACE == 0 {
                break;
            }
            if c == '\r' || c == '\n' {
                last_nl_end = Some(j + l);
            }
            last_start = j;
            j += l;
        }
        // 5. \s*[\r\n]
        if let Some(e) = last_nl_end {
            return e;
        }
        // 6. \s+(?!\S)
        if j == n {
            return j;
        }
        if last_start > i {
            return last_start;
        }
        // 7. \s+
        j
    }
}

#[inline]
fn decode(s: &str, i: usize) -> (char, usize) {
    let b = s.as_bytes()[i];
    if b < 0x80 {
        (b as char, 1)
    } else {
        let c = s[i..].chars().next().unwrap();
        (c, c.len_utf8())
    }
}

#[inline]
fn letters_end(s: &str, mut j: usize, t: &Classes) -> usize {
    let n = s.len();
    while j < n {
        let (c, l) = decode(s, j);
        if class_of(c, t) & LETTER == 0 {
            break;
        }
        j += l;
    }
    j
}
