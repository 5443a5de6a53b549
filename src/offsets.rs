//! Offset tracking and the offset file store (DESIGN.md section 4).
//!
//! [`Tracker`] holds, for one partition, every offset received and not yet
//! finished. Messages may finish in any order (ordered, keyed and
//! unordered delivery all use the same tracker); the commit position is
//! always the lowest offset not yet finished, so a crash at any moment
//! re-delivers but never loses.
//!
//! [`FileStore`] keeps `<dir>/<group>/<topic>-<partition>.offset`, written
//! through a temporary file, fsync and rename so that a crash leaves either
//! the old or the new position, never a torn one.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Offsets of one partition between "received" and "committed".
#[derive(Debug, Default)]
pub struct Tracker {
    /// Received offsets in increasing order, each with its "finished" flag.
    /// Finished offsets at the front are popped at once, so the front is
    /// always the lowest unfinished offset.
    pending: VecDeque<(i64, bool)>,
    /// One past the highest offset received: the commit position when
    /// nothing is pending.
    next: Option<i64>,
    /// Entries of `pending` not yet finished.
    unfinished: usize,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received and is now being handled.
    /// Offsets must arrive in increasing order (as Kafka delivers them in a
    /// partition); an offset at or below one already seen is ignored and
    /// `false` is returned (a duplicate after a seek).
    pub fn begin(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next = Some(offset + 1);
        self.unfinished += 1;
        true
    }

    /// Records that every module reached a final outcome for `offset`.
    pub fn finish(&mut self, offset: i64) {
        if let Ok(i) = self.pending.binary_search_by_key(&offset, |&(o, _)| o) {
            if !self.pending[i].1 {
                self.pending[i].1 = true;
                self.unfinished -= 1;
            }
        }
        while self.pending.front().is_some_and(|&(_, done)| done) {
            self.pending.pop_front();
        }
    }

    /// The offset to commit: the lowest unfinished one, or one past the
    /// highest received when everything is finished. `None` before the
    /// first message.
    pub fn commit_position(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(offset, _)) => Some(offset),
            None => self.next,
        }
    }

    /// Messages received and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.unfinished
    }

    /// The lowest unfinished offset, if any.
    pub fn oldest_unfinished(&self) -> Option<i64> {
        self.pending.front().map(|&(offset, _)| offset)
    }
}

/// mkc's own offset store: one small file per partition.
#[derive(Debug, Clone)]
pub struct FileStore {
    /// `<offset.store.path>/<group>`.
    dir: PathBuf,
}

impl FileStore {
    /// A store for `group` under `root`; the directory is created.
    pub fn open(root: &Path, group: &str) -> io::Result<FileStore> {
        let dir = root.join(group);
        fs::create_dir_all(&dir)?;
        Ok(FileStore { dir })
    }

    pub fn path(&self, topic: &str, partition: i32) -> PathBuf {
        self.dir.join(format!("{topic}-{partition}.offset"))
    }

    /// The stored next offset to consume, `None` when nothing is stored.
    pub fn load(&self, topic: &str, partition: i32) -> io::Result<Option<i64>> {
        let path = self.path(topic, partition);
        match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<i64>().map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not an offset: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores `offset` (the next offset to consume) durably.
    pub fn store(&self, topic: &str, partition: i32, offset: i64) -> io::Result<()> {
        let path = self.path(topic, partition);
        let tmp = path.with_extension(format!("offset.tmp.{}", std::process::id()));
        {
            let mut file = fs::File::create(&tmp)?;
            writeln!(file, "{offset}")?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        // The rename itself is durable once the directory is synced.
        fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_received_has_no_position() {
        assert_eq!(Tracker::new().commit_position(), None);
    }

    #[test]
    fn in_order_completion_advances() {
        let mut t = Tracker::new();
        t.begin(10);
        t.begin(11);
        assert_eq!(t.commit_position(), Some(10));
        t.finish(10);
        assert_eq!(t.commit_position(), Some(11));
        t.finish(11);
        assert_eq!(t.commit_position(), Some(12));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn out_of_order_completion_commits_lowest_unfinished() {
        let mut t = Tracker::new();
        for o in 0..5 {
            t.begin(o);
        }
        t.finish(3);
        t.finish(1);
        assert_eq!(t.commit_position(), Some(0));
        t.finish(0);
        assert_eq!(t.commit_position(), Some(2));
        t.finish(4);
        t.finish(2);
        assert_eq!(t.commit_position(), Some(5));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut t = Tracker::new();
        t.begin(5);
        t.begin(9);
        t.finish(9);
        assert_eq!(t.commit_position(), Some(5));
        t.finish(5);
        assert_eq!(t.commit_position(), Some(10));
    }

    #[test]
    fn duplicates_and_unknown_offsets_are_ignored() {
        let mut t = Tracker::new();
        assert!(t.begin(3));
        assert!(!t.begin(3));
        assert!(!t.begin(1));
        t.finish(7);
        assert_eq!(t.commit_position(), Some(3));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn file_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "g").unwrap();
        assert_eq!(store.load("t", 0).unwrap(), None);
        store.store("t", 0, 42).unwrap();
        store.store("t", 0, 43).unwrap();
        assert_eq!(store.load("t", 0).unwrap(), Some(43));
        assert!(dir.path().join("g/t-0.offset").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("g")).unwrap().count(),
            1,
            "no temporary file left behind"
        );
    }

    #[test]
    fn file_store_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "g").unwrap();
        std::fs::write(store.path("t", 1), "oops").unwrap();
        assert!(store.load("t", 1).is_err());
    }
}
