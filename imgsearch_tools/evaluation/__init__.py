"""`imgsearch eval`: the offline evaluation protocol, its runner and its report."""
