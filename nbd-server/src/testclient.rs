//! test client
