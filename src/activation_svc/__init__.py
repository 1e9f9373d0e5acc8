"""The activation service: the machine manufacturer activates an enrolled device with its metadata."""
