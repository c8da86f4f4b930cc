"""The jobs of faceforge: dataset readers, synthetic faces, precompute (Ray Data), train, publish, CLI."""
