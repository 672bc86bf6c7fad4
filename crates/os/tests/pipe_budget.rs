//! The pipe budget, in a test binary of its own: it opens every pipe the
//! budget allows, which would starve other tests running beside it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use baton_os::{open_pipes, pipe_budget, SplicePipe};

#[test]
fn pipes_beyond_the_budget_are_refused_and_their_places_come_back() {
    assert_eq!(open_pipes(), 0);
    let mut held = Vec::new();
    let refused = loop {
        match SplicePipe::new(4096) {
            Ok(p) => held.push(p),
            Err(e) => break e,
        }
        assert!(held.len() <= pipe_budget(), "more pipes than the budget");
    };
    assert_eq!(refused.to_string(), "pipe budget used up");
    assert_eq!(held.len(), pipe_budget());
    assert_eq!(open_pipes(), pipe_budget());
    // A refusal takes no place; one pipe given back makes room for one.
    held.pop();
    assert_eq!(open_pipes(), pipe_budget() - 1);
    held.push(SplicePipe::new(4096).unwrap());
    drop(held);
    assert_eq!(open_pipes(), 0);
    SplicePipe::new(4096).unwrap();
    assert_eq!(open_pipes(), 0);
}
