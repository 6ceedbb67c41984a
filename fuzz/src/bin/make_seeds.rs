//! Writes the seed corpus: `cargo run --release --bin make_seeds` (from `fuzz/`).
//!
//! Every seed is a value of the target's input type (see `src/seeds.rs`), encoded in the
//! layout `arbitrary` decodes (see `src/input.rs`); the file name is the case's name.

use std::{fs, io, path::Path};

use tower_refresh_coalesce_fuzz::{input::Encode, seeds};

fn write<T: Encode>(dir: &Path, seeds: Vec<(String, T)>) -> io::Result<usize> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let count = seeds.len();
    for (name, input) in seeds {
        fs::write(dir.join(name), input.to_bytes())?;
    }
    Ok(count)
}

fn main() -> io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let front = write(&root.join("front"), seeds::front_seeds())?;
    let token = write(&root.join("token"), seeds::token_seeds())?;
    println!(
        "wrote {front} front seeds and {token} token seeds under {}",
        root.display()
    );
    Ok(())
}
