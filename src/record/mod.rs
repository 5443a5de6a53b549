//! What mkc keeps of messages that did not go through: the dispatch log
//! table, dead-letter topics, and `mkc replay`.

pub mod dead_letter;
pub mod dispatch_log;
pub mod replay;
