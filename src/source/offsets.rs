//! Offset tracking and the offset file store (DESIGN.md section 4).
//!
//! [`Tracker`] holds, for one partition, every offset received and not yet
//! finished. Messages may finish in any order (ordered, keyed and
//! unordered delivery all use the same tracker); the commit position is
//! always the lowest offset not yet finished, so a crash at any moment
//! re-delivers but never loses.
//!
//! Offsets normally arrive in increasing order. One that goes backwards on
//! a live partition is a seek by librdkafka (the log was truncated after
//! an unclean leader election, KIP-320, or the offset was reset): the
//! messages from there on are new and are delivered, while the old ones
//! above it may still be in flight. The tracker counts the deliveries of
//! each offset and never commits past the last offset received, so that
//! neither the old deliveries finishing nor the new ones let a commit pass
//! a message not yet received again.
//!
//! [`FileStore`] keeps `<dir>/<group>/<topic>-<partition>.offset`, written
//! through a temporary file, fsync and rename so that a crash leaves either
//! the old or the new position, never a torn one.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How an offset arrived, as [`Tracker::begin`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Past every offset received so far: the normal case.
    Forward,
    /// At or below one already received: the partition was moved back
    /// (a seek) from `expected`, the offset that should have come.
    Backward { expected: i64 },
}

/// Offsets of one partition between "received" and "committed".
#[derive(Debug, Default)]
pub struct Tracker {
    /// Received offsets in increasing order, each with its deliveries not
    /// yet finished (more than one only after a seek re-used the offset).
    /// Entries at zero at the front are popped at once, so the front is
    /// always the lowest unfinished offset.
    pending: VecDeque<(i64, u32)>,
    /// One past the offset received last: where the partition reads next.
    /// The commit position never passes it (after a seek, old deliveries
    /// above it may finish before the offsets below them come again).
    next: Option<i64>,
    /// Deliveries begun and not yet finished.
    unfinished: usize,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received and is now being handled; each
    /// call is ended by one [`Tracker::finish`]. An offset at or below one
    /// already received is a seek: it is taken all the same (its message
    /// is delivered) and reported as [`Arrival::Backward`].
    pub fn begin(&mut self, offset: i64) -> Arrival {
        let arrival = match self.next {
            Some(expected) if offset < expected => Arrival::Backward { expected },
            _ => Arrival::Forward,
        };
        // Past every pending offset: the usual case. After a seek, offsets
        // of the old deliveries still pending may lie above this one.
        if self.pending.back().is_none_or(|&(last, _)| last < offset) {
            self.pending.push_back((offset, 1));
        } else {
            match self.pending.binary_search_by_key(&offset, |&(o, _)| o) {
                Ok(i) => self.pending[i].1 += 1,
                Err(i) => self.pending.insert(i, (offset, 1)),
            }
        }
        self.next = Some(offset + 1);
        self.unfinished += 1;
        arrival
    }

    /// Records that every module reached a final outcome for one delivery
    /// of `offset`. An offset not in flight is ignored.
    pub fn finish(&mut self, offset: i64) {
        if let Ok(i) = self.pending.binary_search_by_key(&offset, |&(o, _)| o) {
            if self.pending[i].1 > 0 {
                self.pending[i].1 -= 1;
                self.unfinished -= 1;
            }
        }
        while self.pending.front().is_some_and(|&(_, left)| left == 0) {
            self.pending.pop_front();
        }
    }

    /// The offset to commit: the lowest unfinished one, or one past the
    /// offset received last, whichever is lower. `None` before the first
    /// message.
    pub fn commit_position(&self) -> Option<i64> {
        match (self.pending.front(), self.next) {
            (Some(&(offset, _)), Some(next)) => Some(offset.min(next)),
            (Some(&(offset, _)), None) => Some(offset),
            (None, next) => next,
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

/// An offset file holds one number and a newline (at most 21 bytes);
/// reading stops here.
pub const MAX_OFFSET_FILE_BYTES: u64 = 64;

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
    /// Only the first [`MAX_OFFSET_FILE_BYTES`] are read: a larger file is
    /// not one mkc wrote, and an error.
    pub fn load(&self, topic: &str, partition: i32) -> io::Result<Option<i64>> {
        use std::io::Read;
        let path = self.path(topic, partition);
        let invalid = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(MAX_OFFSET_FILE_BYTES + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_OFFSET_FILE_BYTES {
            return Err(invalid(format!(
                "not an offset: larger than {MAX_OFFSET_FILE_BYTES} bytes"
            )));
        }
        let text = String::from_utf8_lossy(&bytes);
        text.trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|e| invalid(format!("not an offset: {e}")))
    }

    /// Stores `offset` (the next offset to consume) durably.
    pub fn store(&self, topic: &str, partition: i32, offset: i64) -> io::Result<()> {
        let path = self.path(topic, partition);
        let tmp = path.with_extension(format!("offset.tmp.{}", std::process::id()));
        let written = (|| {
            let mut file = fs::File::create(&tmp)?;
            writeln!(file, "{offset}")?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            // A full disk leaves an empty or partial temporary file: gone
            // with it, nothing but whole offset files stays in the store.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
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
    fn unknown_offsets_are_ignored() {
        let mut t = Tracker::new();
        assert_eq!(t.begin(3), Arrival::Forward);
        t.finish(7);
        assert_eq!(t.commit_position(), Some(3));
        assert_eq!(t.in_flight(), 1);
        t.finish(3);
        t.finish(3);
        assert_eq!(t.commit_position(), Some(4));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn the_same_offset_again_is_a_seek_and_counted_twice() {
        let mut t = Tracker::new();
        assert_eq!(t.begin(3), Arrival::Forward);
        assert_eq!(t.begin(3), Arrival::Backward { expected: 4 });
        assert_eq!(t.in_flight(), 2);
        t.finish(3);
        assert_eq!(t.commit_position(), Some(3), "one delivery of 3 is left");
        t.finish(3);
        assert_eq!(t.commit_position(), Some(4));
    }

    #[test]
    fn an_offset_going_backwards_is_delivered_again() {
        // The log was truncated at 2 (an unclean leader election): the
        // broker's new messages re-use offsets 2, 3, ... while the old
        // ones at 2..4 are still being delivered.
        let mut t = Tracker::new();
        for o in 0..5 {
            t.begin(o);
        }
        t.finish(0);
        t.finish(1);
        assert_eq!(t.begin(2), Arrival::Backward { expected: 5 });
        assert_eq!(t.in_flight(), 4, "the new message at offset 2 is taken");
        // The old deliveries of 2..4 end.
        t.finish(2);
        t.finish(3);
        t.finish(4);
        assert_eq!(
            t.commit_position(),
            Some(2),
            "the new message at 2 is not finished: no commit past it"
        );
        assert_eq!(t.in_flight(), 1);
        t.finish(2);
        assert_eq!(
            t.commit_position(),
            Some(3),
            "offset 3 was not received again yet: the commit stops there"
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn deliveries_above_a_seek_do_not_move_the_commit_past_it() {
        // An offset reset moves the partition from 10 back to 3 while 5..9
        // are in flight.
        let mut t = Tracker::new();
        for o in 0..10 {
            t.begin(o);
        }
        for o in 0..5 {
            t.finish(o);
        }
        assert_eq!(t.commit_position(), Some(5));
        assert_eq!(t.begin(3), Arrival::Backward { expected: 10 });
        assert_eq!(t.commit_position(), Some(3));
        t.finish(3);
        assert_eq!(t.commit_position(), Some(4), "4 is not received again yet");
        t.begin(4);
        t.finish(4);
        for o in 5..10 {
            t.finish(o);
        }
        assert_eq!(
            t.commit_position(),
            Some(5),
            "5..9 finished their old deliveries, not the new ones"
        );
        for o in 5..10 {
            t.begin(o);
        }
        assert_eq!(t.in_flight(), 5);
        for o in 5..10 {
            t.finish(o);
        }
        assert_eq!(t.commit_position(), Some(10));
        assert_eq!(t.in_flight(), 0);
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
        let big = store.path("t", 2);
        std::fs::write(&big, vec![b'1'; 10 << 20]).unwrap();
        let error = store.load("t", 2).unwrap_err().to_string();
        assert!(error.contains("larger than 64 bytes"), "{error}");
        assert!(store.load("t", 1).is_err());
    }
}
