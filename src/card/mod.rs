//! Card data types: parsing and validation of PAN, expiry, CVV and cardholder
//! name.
//!
//! Every secret (PAN, CVV, name) lives in a [`zeroize::Zeroizing`] buffer so it
//! is wiped on drop, and none of them implements a `Debug` or `Display` that
//! could leak it into logs. Validation errors name the field and the reason
//! only; they never echo the rejected value.

mod brand;
mod cvv;
mod expiry;
mod name;
mod pan;

pub use brand::Brand;
pub use cvv::Cvv;
pub use expiry::{Expiry, YearMonth};
pub use name::CardholderName;
pub use pan::{Pan, luhn_valid, mask_digits, with_check_digit};
