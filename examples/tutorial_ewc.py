"""Continual learning with Elastic Weight Consolidation (EWC): a tutorial of the Neurenix continual-learning API.

    python examples/tutorial_ewc.py                      # MNIST under ./data, downloaded if missing
    python examples/tutorial_ewc.py --root DIR           # a copy you have: in DIR/MNIST/raw/ or DIR itself
    python examples/tutorial_ewc.py --fast               # CI: 1 epoch per phase, 500 images per set

Split MNIST in two tasks that share one output layer: task 1 is digits 0-4, task 2 digits 5-9
with labels remapped to 0-4. The model learns task 1, EWC consolidates it (Fisher information
from 200 samples), and the model learns task 2 under the EWC penalty; then a second model learns
the same two tasks without EWC. ``ewc_comparison.png`` plots both tasks' test accuracy during
task 2, with and without EWC. Needs matplotlib: ``pip install "neurenix[tutorials]"``.

What to expect: with the published settings (``importance=1000.0``, Adam), EWC keeps no more of
task 1 than plain fine-tuning in this one-head setting (measured with Fashion-MNIST standing in
for MNIST, task 1 accuracy after task 2, with EWC and without: 0.24 and 0.20 in one run, 0.23
and 0.24 in another; ``nx.init()`` keeps PyTorch's random seed, so runs differ);
docs/methods/ewc.md, "When it helps", says why. ``examples/tutorial_replay.py`` is the same
experiment with experience replay, which does keep task 1 (0.65 against 0.22).

Data: MNIST is read from ``ROOT/MNIST/raw/`` or ``ROOT`` itself (plain or ``.gz`` IDX files;
torchvision's layout, so its downloads are reused) and the missing files are downloaded into
``ROOT/MNIST/raw/``. Without a network the download fails with a message that says so and
suggests ``--root DIR``, DIR a folder that holds the four files; the folders made for the
download are removed again. Fashion-MNIST's files (the same format) are read too, with a
warning: the first line of the output names the dataset read, since the tutorial's own lines
say "digits" whatever it is.

Run time on the 2-core development machine, Fashion-MNIST standing in for MNIST (there is no
MNIST copy there), 5 epochs per phase as published: 116 s, and 102 s with ``OMP_NUM_THREADS=1``
(``time python examples/tutorial_ewc.py --root /usr/share/datasets/fashion-mnist``).
``--fast`` takes about 12 s.

Below the docstring, the code is the published tutorial's, unchanged except for the lines
marked "not in the published tutorial": the data root, the number of epochs and (``--fast``,
``--samples``) the number of images come from the command line, a first line names the
dataset read, and one line prints the final accuracies. tests/test_examples.py checks that
nothing else differs.
"""

# >>> not in the published tutorial: where MNIST is, how long to train (CI runs --fast)
import argparse
import warnings

from neurenix.data import DownloadError, FashionMNIST, MNIST as MNISTFiles

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--root", default="./data", help="a folder holding MNIST's four files, in ROOT/MNIST/raw/ or ROOT itself; "
                    "missing files are downloaded into ROOT/MNIST/raw/ (default: ./data)")  # fmt: skip
parser.add_argument("--epochs", type=int, default=5, help="epochs of each training phase (default: 5, as published)")
parser.add_argument("--samples", type=int, default=None, help="keep only the first SAMPLES images of each task's training and test sets")
parser.add_argument("--fast", action="store_true", help="a smoke run: --epochs 1 --samples 500")
args = parser.parse_args()
if args.fast:
    args.epochs, args.samples = 1, args.samples or 500
ROOT, EPOCHS = args.root, args.epochs


def fetch_and_name_the_data(root):
    """Download what is missing now, so that a failed download can say what to do, and print
    which dataset ROOT holds: the tutorial's own lines say "digits" whatever it reads."""
    try:
        test_set = MNISTFiles(root, train=False, download=True)
    except DownloadError as error:
        parser.exit(1, f"{error}\nNo network? Run again with --root DIR, DIR a folder that holds MNIST's four files.\n")
    if test_set.recognized_as == "Fashion-MNIST":
        warnings.filterwarnings("ignore", message=".*holds Fashion-MNIST")  # said once (just above); the tutorial reads it 4 times
        first, last = ", ".join(FashionMNIST.classes[:5]), ", ".join(FashionMNIST.classes[5:])
        print(f"Data: Fashion-MNIST from {root}, not MNIST: below, 'digits 0-4' are its classes {first}; 'digits 5-9' are {last}")
    elif test_set.recognized_as == "MNIST":
        print(f"Data: MNIST from {root}")
    else:
        print(f"Data: MNIST-format files from {root}, neither MNIST nor Fashion-MNIST in full ({len(test_set)} test images)")


fetch_and_name_the_data(ROOT)


def keep_first(*datasets):
    """--samples N: keep the first N samples of each dataset (MNIST holds them as tensors)."""
    if args.samples is not None:
        for dataset in datasets:
            dataset.data, dataset.targets = dataset.data[: args.samples], dataset.targets[: args.samples]
# <<< not in the published tutorial

import neurenix as nx
from neurenix.nn import Sequential, Linear, ReLU
from neurenix.optim import Adam
from neurenix.continual import EWC
from neurenix.data import DataLoader
import matplotlib.pyplot as plt

# Initialize Neurenix
nx.init()

# Create a model for digit classification
model = Sequential(
    Linear(784, 256),
    ReLU(),
    Linear(256, 128),
    ReLU(),
    Linear(128, 10)
)

# Create an EWC wrapper
ewc = EWC(model, importance=1000.0, fisher_sample_size=200)

# Create an optimizer
optimizer = Adam(model.parameters(), lr=0.001)

# Create a loss function
loss_fn = nx.nn.CrossEntropyLoss()

# Load MNIST dataset (task 1: digits 0-4)
task1_dataset = nx.data.MNIST(
    root=ROOT,
    train=True,
    download=True,
    transform=lambda x: x.reshape(-1) / 255.0,
    target_transform=None,
    filter_labels=lambda y: y < 5
)

# Load MNIST dataset (task 2: digits 5-9)
task2_dataset = nx.data.MNIST(
    root=ROOT,
    train=True,
    download=True,
    transform=lambda x: x.reshape(-1) / 255.0,
    target_transform=lambda y: y - 5,  # Remap labels to 0-4
    filter_labels=lambda y: y >= 5
)

keep_first(task1_dataset, task2_dataset)  # not in the published tutorial

# Create data loaders
task1_loader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
task2_loader = DataLoader(task2_dataset, batch_size=32, shuffle=True)

# Create test datasets
task1_test = nx.data.MNIST(
    root=ROOT,
    train=False,
    download=True,
    transform=lambda x: x.reshape(-1) / 255.0,
    target_transform=None,
    filter_labels=lambda y: y < 5
)

task2_test = nx.data.MNIST(
    root=ROOT,
    train=False,
    download=True,
    transform=lambda x: x.reshape(-1) / 255.0,
    target_transform=lambda y: y - 5,
    filter_labels=lambda y: y >= 5
)

keep_first(task1_test, task2_test)  # not in the published tutorial

# Create test loaders
task1_test_loader = DataLoader(task1_test, batch_size=100, shuffle=False)
task2_test_loader = DataLoader(task2_test, batch_size=100, shuffle=False)

# Function to evaluate model on a dataset
def evaluate(model, dataloader):
    model.eval()
    correct = 0
    total = 0

    for inputs, targets in dataloader:
        outputs = model(inputs)
        predictions = outputs.argmax(dim=1)
        correct += (predictions == targets).sum().item()
        total += targets.size(0)

    return correct / total

# Train on task 1
print("Training on task 1 (digits 0-4)...")
task1_accuracies = []

for epoch in range(EPOCHS):
    model.train()
    for inputs, targets in task1_loader:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()

    # Evaluate on both tasks
    task1_acc = evaluate(model, task1_test_loader)
    task2_acc = evaluate(model, task2_test_loader)
    task1_accuracies.append((task1_acc, task2_acc))

    print(f"Epoch {epoch+1}, Task 1 accuracy: {task1_acc:.4f}, Task 2 accuracy: {task2_acc:.4f}")

# Register task 1 for EWC
print("Computing Fisher information matrix for task 1...")
ewc.register_task(task_id=1, dataloader=task1_loader)

# Train on task 2 with EWC
print("Training on task 2 (digits 5-9) with EWC...")
ewc_accuracies = []

for epoch in range(EPOCHS):
    model.train()
    for inputs, targets in task2_loader:
        ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=2)

    # Evaluate on both tasks
    task1_acc = evaluate(model, task1_test_loader)
    task2_acc = evaluate(model, task2_test_loader)
    ewc_accuracies.append((task1_acc, task2_acc))

    print(f"Epoch {epoch+1}, Task 1 accuracy: {task1_acc:.4f}, Task 2 accuracy: {task2_acc:.4f}")

# Train on task 2 without EWC (for comparison)
print("Training on task 2 (digits 5-9) without EWC (for comparison)...")

# Reset the model
model = Sequential(
    Linear(784, 256),
    ReLU(),
    Linear(256, 128),
    ReLU(),
    Linear(128, 10)
)

optimizer = Adam(model.parameters(), lr=0.001)

# Train on task 1
for epoch in range(EPOCHS):
    model.train()
    for inputs, targets in task1_loader:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()

# Train on task 2 without EWC
no_ewc_accuracies = []

for epoch in range(EPOCHS):
    model.train()
    for inputs, targets in task2_loader:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()

    # Evaluate on both tasks
    task1_acc = evaluate(model, task1_test_loader)
    task2_acc = evaluate(model, task2_test_loader)
    no_ewc_accuracies.append((task1_acc, task2_acc))

    print(f"Epoch {epoch+1}, Task 1 accuracy: {task1_acc:.4f}, Task 2 accuracy: {task2_acc:.4f}")

print(f"Task 1 accuracy after task 2: with EWC {ewc_accuracies[-1][0]:.4f}, without EWC {no_ewc_accuracies[-1][0]:.4f}")  # not in the published tutorial

# Plot results
plt.figure(figsize=(12, 5))

# Plot task 1 accuracy
plt.subplot(1, 2, 1)
plt.plot([acc[0] for acc in ewc_accuracies], 'b-', label='With EWC')
plt.plot([acc[0] for acc in no_ewc_accuracies], 'r-', label='Without EWC')
plt.xlabel('Epoch')
plt.ylabel('Task 1 Accuracy')
plt.title('Task 1 (Digits 0-4) Accuracy During Task 2 Training')
plt.legend()

# Plot task 2 accuracy
plt.subplot(1, 2, 2)
plt.plot([acc[1] for acc in ewc_accuracies], 'b-', label='With EWC')
plt.plot([acc[1] for acc in no_ewc_accuracies], 'r-', label='Without EWC')
plt.xlabel('Epoch')
plt.ylabel('Task 2 Accuracy')
plt.title('Task 2 (Digits 5-9) Accuracy During Task 2 Training')
plt.legend()

plt.tight_layout()
plt.savefig('ewc_comparison.png')
plt.show()
