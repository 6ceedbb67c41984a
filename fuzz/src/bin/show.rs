//! Prints what a fuzz input decodes to: `cargo run --bin show -- <front|token> <file>...`.

use tower_refresh_coalesce_fuzz::input::{FrontInput, TokenInput, decode};

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: show <front|token> <file>...");
    for path in args {
        let bytes = std::fs::read(&path).expect("readable file");
        println!("{path}:");
        match target.as_str() {
            "front" => println!("{:#?}", decode::<FrontInput>(&bytes)),
            "token" => println!("{:#?}", decode::<TokenInput>(&bytes)),
            other => panic!("unknown target {other}"),
        }
    }
}
