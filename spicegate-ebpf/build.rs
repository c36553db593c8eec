use which::which;

/// Rebuild when bpf-linker changes, and fail with a sentence rather than a
/// linker backtrace when it is missing.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker is not installed: run `cargo xtask setup` \
             (or `cargo install bpf-linker@0.10.4 --locked`)"
        ),
    }
}
