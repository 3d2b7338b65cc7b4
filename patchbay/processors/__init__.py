"""Steps a record passes through between trigger and destinations: map, validate, filter, ..."""
