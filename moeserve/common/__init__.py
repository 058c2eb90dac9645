"""What two or more components share: block hashing, config and spec types, errors."""
