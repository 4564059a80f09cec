"""`imgsearch bench` and `bench-suite`: load generation, scenarios and the serving report."""
