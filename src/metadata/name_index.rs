//! A snapshot's topics by name, as routes in hash maps built on demand.
//!
//! Every produce and fetch names its topic, and with 10,000 topics the
//! ordered map's lookup (a binary search per tree node, each compare a
//! cache miss on a name elsewhere in the heap) was 22% of the broker's
//! CPU. The hash map finds a name with one probe. Names of up to
//! `INLINE_NAME_BYTES` (nearly all) are kept in the slot itself, next to
//! their [`Route`], so a lookup compares and answers without leaving it:
//! a key behind a pointer was one more miss and a `memcmp` per lookup
//! (7% of the broker with one-message batches). The maps are built once
//! per snapshot and only after the snapshot has served `TREE_LOOKUPS_MAX`
//! lookups, so a burst of creations (one short-lived snapshot each) never
//! copies every name per change.

use super::route::Route;
use super::TopicMeta;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// Lookups a snapshot answers from its tree before it builds the index:
/// about what building it for 10,000 topics costs.
const TREE_LOOKUPS_MAX: u32 = 1024;
/// Longest name kept in its slot (with its length byte, 40 bytes).
const INLINE_NAME_BYTES: usize = 39;

type Hasher = foldhash::fast::RandomState;

/// A name of at most `INLINE_NAME_BYTES`, zero-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ShortName {
    len: u8,
    bytes: [u8; INLINE_NAME_BYTES],
}

impl ShortName {
    fn new(name: &str) -> Option<ShortName> {
        let mut bytes = [0; INLINE_NAME_BYTES];
        bytes
            .get_mut(..name.len())?
            .copy_from_slice(name.as_bytes());
        Some(ShortName {
            len: name.len() as u8,
            bytes,
        })
    }
}

#[derive(Default)]
struct Routes {
    short: HashMap<ShortName, Route, Hasher>,
    long: HashMap<Arc<str>, Route, Hasher>,
}

#[derive(Default)]
pub(super) struct NameIndex {
    built: OnceLock<Routes>,
    tree_lookups: AtomicU32,
}

impl NameIndex {
    /// The route of `tree`'s topic called `name`; `tree` must be the map
    /// this index was (or will be) built from, which `Metadata` ensures by
    /// starting the index over on every change.
    pub(super) fn get<'a>(
        &'a self,
        tree: &'a imbl::OrdMap<Arc<str>, Arc<TopicMeta>>,
        name: &str,
    ) -> Option<Cow<'a, Route>> {
        let routes = match self.built.get() {
            Some(r) => r,
            None if self.tree_lookups.fetch_add(1, Ordering::Relaxed) < TREE_LOOKUPS_MAX => {
                return tree.get(name).map(|t| Cow::Owned(Route::of(t)));
            }
            None => self.built.get_or_init(|| build(tree)),
        };
        match ShortName::new(name) {
            Some(short) => routes.short.get(&short),
            None => routes.long.get(name),
        }
        .map(Cow::Borrowed)
    }
}

fn build(tree: &imbl::OrdMap<Arc<str>, Arc<TopicMeta>>) -> Routes {
    let mut routes = Routes::default();
    for (name, t) in tree {
        match ShortName::new(name) {
            Some(short) => routes.short.insert(short, Route::of(t)),
            None => routes.long.insert(name.clone(), Route::of(t)),
        };
    }
    routes
}

/// A clone is made to be changed: its index starts over.
impl Clone for NameIndex {
    fn clone(&self) -> Self {
        NameIndex::default()
    }
}

impl std::fmt::Debug for NameIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameIndex")
            .field("built", &self.built.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Flush, TopicSpec};

    fn tree(names: &[String]) -> imbl::OrdMap<Arc<str>, Arc<TopicMeta>> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let t = TopicMeta {
                    spec: TopicSpec {
                        name: n.clone(),
                        queues: 1,
                        flush: Flush::Async,
                        segment_bytes: 0,
                        retention_ms: 0,
                        retention_bytes: 0,
                    },
                    id: i as u32,
                    placement: vec![0],
                };
                (Arc::from(n.as_str()), Arc::new(t))
            })
            .collect()
    }

    #[test]
    fn short_and_long_names_are_found_before_and_after_the_build() {
        // Lengths around the inline limit; names that share a prefix, and
        // a short name that is a prefix of a long one.
        let names: Vec<String> = [1, 2, INLINE_NAME_BYTES - 1, INLINE_NAME_BYTES]
            .into_iter()
            .chain([INLINE_NAME_BYTES + 1, 249])
            .flat_map(|len| ["a", "b"].map(|c| c.repeat(len)))
            .collect();
        let t = tree(&names);
        let index = NameIndex::default();
        for round in 0..2 {
            for _ in 0..TREE_LOOKUPS_MAX * round {
                index.get(&t, "x");
            }
            for (i, n) in names.iter().enumerate() {
                let r = index.get(&t, n).unwrap_or_else(|| panic!("{n}"));
                assert_eq!(r.id, i as u32, "{n}");
            }
            for missing in ["", "c", &"a".repeat(3), &"a".repeat(INLINE_NAME_BYTES + 2)] {
                assert!(index.get(&t, missing).is_none(), "{missing:?}");
            }
            assert_eq!(index.built.get().is_some(), round == 1);
        }
    }
}
