"""Datasets of fine solves (pipeline step 4): the state domain
(:mod:`~neuroscale_coupling.data.domain`), what determines a dataset
(:mod:`~neuroscale_coupling.data.spec`), the dataset record and its file
(:mod:`~neuroscale_coupling.data.dataset`), MPI-parallel generation with a fine solver
(:mod:`~neuroscale_coupling.data.generate`) and the split by microstructure
(:mod:`~neuroscale_coupling.data.split`)::

    spec = DatasetSpec(material, family, domain, n_cells=64, states_per_cell=16)
    data = generate(spec, comm=MPI.COMM_WORLD)       # collective; every rank gets it all
    train, val, test = split(data, seed=0)           # by microstructure
    data.save("thermal.pt"); Dataset.load("thermal.pt")
"""
