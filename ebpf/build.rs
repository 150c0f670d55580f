//! Rebuild when bpf-linker changes: rustc does not track the linker binary itself.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
