"""From disk to two-view training batches.

    datasets.py    in-memory arrays and image files, with their labels and splits
    budget.py      BudgetSampler: each epoch's seeded subset of the training set, shared across ranks
    views.py       ViewSpec and the BYOL/RELA view pairs, made on the device from uint8 batches
    interfaces.py  the Protocols every loader satisfies: ImageSource, TrainLoader (and TrainBatch)
    loader.py      the torch loader: TorchImageSource, TorchTrainLoader
    dali/          the DALI loader: graphs, host driver, DaliImageSource, DaliTrainLoader
    factory.py     which loader a run uses (--loader torch|dali|auto), built in one call
"""
