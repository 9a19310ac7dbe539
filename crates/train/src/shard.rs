//! `--shard I/N`: one job of an array (SLURM `--array=0-(N-1)` with `$SLURM_ARRAY_TASK_ID`, a
//! Kubernetes indexed job with `$JOB_COMPLETION_INDEX`) takes every N-th item of a list,
//! starting at item I (0-based). The split depends only on the list's order, so the N jobs
//! together cover every item exactly once.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, bail};

/// Shard `index` of `count` (0 ≤ index < count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// The one shard of an unsharded job.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`; refused unless `0 ≤ index < count`.
    pub fn new(index: usize, count: usize) -> crate::Result<Shard> {
        if count == 0 {
            bail!("shard {index}/{count}: the number of shards must be at least 1");
        }
        if index >= count {
            bail!(
                "shard {index}/{count}: the index is 0-based, from 0 to {} (SLURM: --array=0-{})",
                count - 1,
                count - 1
            );
        }
        Ok(Shard { index, count })
    }

    /// Whether item `i` of the list belongs to this shard (`i mod N = I`).
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// This shard's items of `items`, in their order.
    pub fn select<T>(&self, items: impl IntoIterator<Item = T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.contains(*i))
            .map(|(_, item)| item)
            .collect()
    }
}

impl FromStr for Shard {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Shard> {
        let (index, count) = text
            .split_once('/')
            .with_context(|| format!("shard `{text}`: expected I/N, e.g. 0/4"))?;
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("shard `{text}`: `{s}` is not a whole number"))
        };
        Shard::new(number(index)?, number(count)?)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_every_list() {
        for count in 1..6 {
            for len in 0..12 {
                let mut seen = Vec::new();
                for index in 0..count {
                    seen.extend(Shard::new(index, count).expect("valid").select(0..len));
                }
                seen.sort_unstable();
                assert_eq!(
                    seen,
                    (0..len).collect::<Vec<_>>(),
                    "{count} shards of {len}"
                );
            }
        }
        let shard: Shard = "1/3".parse().expect("parses");
        assert_eq!(shard.select(["a", "b", "c", "d", "e"]), ["b", "e"]);
        assert_eq!(shard.to_string(), "1/3");
    }

    #[test]
    fn bad_shards_are_refused_with_the_rule() {
        for (text, expected) in [
            ("3/3", "0-based, from 0 to 2"),
            ("0/0", "at least 1"),
            ("1", "expected I/N"),
            ("a/2", "`a` is not a whole number"),
            ("-1/2", "`-1` is not a whole number"),
        ] {
            let error = text.parse::<Shard>().expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
