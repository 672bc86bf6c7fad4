//! Prints the interface table as JSON, the candidates in order, then one
//! JSON line per interface event until interrupted: a quick way to see what
//! the client agent will see on a machine.
//!
//! `cargo run -p baton-os --example iface_watch`, or inside a namespace with
//! `ip netns exec NS target/debug/examples/iface_watch`.

use std::io;

use tokio::sync::broadcast::error::RecvError;

#[tokio::main(flavor = "current_thread")]
async fn main() -> io::Result<()> {
    let watcher = baton_os::watch().await?;
    let mut events = watcher.subscribe();
    let table = watcher.table();
    println!(
        "{}",
        serde_json::to_string(&table).map_err(io::Error::other)?
    );
    let order: Vec<&str> = table.candidates().iter().map(|i| i.name.as_str()).collect();
    println!("{}", serde_json::json!({ "candidates": order }));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            ev = events.recv() => match ev {
                Ok(ev) => println!("{}", serde_json::to_string(&ev).map_err(io::Error::other)?),
                Err(RecvError::Lagged(n)) => {
                    // Events were missed: the table is still right, so print it.
                    println!("{}", serde_json::json!({ "lagged": n, "table": watcher.table() }));
                }
                Err(RecvError::Closed) => return Err(io::Error::other("interface watcher stopped")),
            },
        }
    }
}
