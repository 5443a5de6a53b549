//! The master process: pid file, daemonize, fork and supervise the
//! worker and admin processes, reload and stop.

pub mod master;
