"""Where training batches come from: prompt lists, image folders, the bundled digits."""
