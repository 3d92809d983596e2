//! Writes the seed corpus (`nodus_fuzz::seeds`) under `corpus/<target>/seed-NN`.
//!
//! Run from the fuzz directory: `cargo run --example seeds` (replaces the `seed-*` files only;
//! inputs the fuzzer found stay).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in nodus_fuzz::seeds::corpus() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) {
                std::fs::remove_file(path)?;
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        eprintln!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}
