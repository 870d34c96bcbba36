def main() -> None:
    print("hecate")
