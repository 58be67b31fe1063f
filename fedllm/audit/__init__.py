"""Privacy auditing: empirical ε lower bounds from canaries planted in a federation."""
