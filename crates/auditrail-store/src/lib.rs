
pub mod crypto;
pub mod io;
pub mod sim;
pub mod segment;
