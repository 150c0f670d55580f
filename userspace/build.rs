//! Builds the eBPF programs (`ebpf/`, nightly, bpfel-unknown-none) into OUT_DIR, where
//! `include_bytes_aligned!` embeds them. Set AYA_BUILD_SKIP=1 to skip (e.g. for docs).
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "vsrscope-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
