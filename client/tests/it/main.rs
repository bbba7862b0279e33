//! Integration tests of tally-client: one binary (see the style guide), no real server.

mod cli;
mod cluster;
