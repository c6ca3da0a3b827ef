//! A snapshot's topics by name, in a hash map built on demand.
//!
//! Every produce and fetch names its topic, and with 10,000 topics the
//! ordered map's lookup (a binary search per tree node, each compare a
//! cache miss on a name elsewhere in the heap) was 22% of the broker's
//! CPU. The hash map finds a name with one probe. It is built once per
//! snapshot and only after the snapshot has served `TREE_LOOKUPS_MAX`
//! lookups, so a burst of creations (one short-lived snapshot each) never
//! copies every name per change.

use super::TopicMeta;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// Lookups a snapshot answers from its tree before it builds the index:
/// about what building it for 10,000 topics costs.
const TREE_LOOKUPS_MAX: u32 = 1024;

type ByName = HashMap<Arc<str>, Arc<TopicMeta>, foldhash::fast::RandomState>;

#[derive(Default)]
pub(super) struct NameIndex {
    built: OnceLock<ByName>,
    tree_lookups: AtomicU32,
}

impl NameIndex {
    /// `tree`'s topic called `name`; `tree` must be the map this index was
    /// (or will be) built from, which `Metadata` ensures by starting the
    /// index over on every change.
    pub(super) fn get<'a>(
        &'a self,
        tree: &'a imbl::OrdMap<Arc<str>, Arc<TopicMeta>>,
        name: &str,
    ) -> Option<&'a Arc<TopicMeta>> {
        if let Some(index) = self.built.get() {
            return index.get(name);
        }
        if self.tree_lookups.fetch_add(1, Ordering::Relaxed) < TREE_LOOKUPS_MAX {
            return tree.get(name);
        }
        self.built
            .get_or_init(|| tree.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .get(name)
    }
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
