//! The `mkc` binary: everything lives in the library; see `mkc::cli`.

fn main() -> std::process::ExitCode {
    mkc::cli::run()
}

/// A guard around a librdkafka (2.12.1) crash on a broker's answer.
///
/// A Fetch response (v16) whose topic carries the zero topic id along with
/// leader-change tags makes librdkafka look the topic up by name in its
/// metadata cache, with no name: `strcmp(NULL, ...)` in its main thread,
/// and the worker dies by SIGSEGV. tansu 0.6 answers exactly so for a topic
/// that was deleted while it was consumed (`unknown_topic_response`: topic
/// id zero, `CurrentLeader` 0, empty `NodeEndpoints`); Kafka answers such a
/// fetch with the topic's own id, so librdkafka never sees it there.
///
/// build.rs links the binary with `--wrap=rd_kafka_metadata_cache_find`:
/// librdkafka's calls from other files of it (the metadata update of a
/// Fetch response among them) come here. A topic without a name is not in
/// the cache: librdkafka logs "Topic (null) not found in cache", skips
/// that topic's leader update and goes on. The worker's topic watch
/// (`mkc::source::topic_watch`) counts it as a hint that its topic is gone.
mod librdkafka_guard {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        /// librdkafka's own `rd_kafka_metadata_cache_find(rk, topic, valid)`.
        fn __real_rd_kafka_metadata_cache_find(
            rk: *mut c_void,
            topic: *const c_char,
            valid: c_int,
        ) -> *mut c_void;
    }

    /// librdkafka's lookup, refusing a NULL topic name (no entry).
    ///
    /// # Safety
    ///
    /// Called by librdkafka only, with its own client handle and a topic
    /// name that is NULL or NUL-terminated.
    #[no_mangle]
    pub unsafe extern "C" fn __wrap_rd_kafka_metadata_cache_find(
        rk: *mut c_void,
        topic: *const c_char,
        valid: c_int,
    ) -> *mut c_void {
        if topic.is_null() {
            mkc::source::topic_watch::fetched_unknown_topic();
            return std::ptr::null_mut();
        }
        // SAFETY: the arguments are librdkafka's own, passed on unchanged
        // to the function it meant to call.
        unsafe { __real_rd_kafka_metadata_cache_find(rk, topic, valid) }
    }
}
