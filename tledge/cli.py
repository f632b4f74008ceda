import click
@click.group()
def main():
    """placeholder"""
