//! Black-box tests of the daemon over real sockets.
