//! Links the `mkc` binary with a guard around one librdkafka function:
//! `rd_kafka_metadata_cache_find` is wrapped (GNU ld / lld `--wrap`) by
//! `__wrap_rd_kafka_metadata_cache_find` in src/main.rs, which refuses a
//! NULL topic name instead of letting librdkafka compare it (SIGSEGV).

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--wrap=rd_kafka_metadata_cache_find");
    println!("cargo:rerun-if-changed=build.rs");
}
