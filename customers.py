"""Customers: create one, read one, list them page by page."""

from fastapi_pagination import Page, Params, create_page
from loguru import logger
from sqlalchemy import Integer, bindparam, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from db import Database, execute_core, is_duplicate_key, retry_conflicts
from errors import ApiError
from models import Customer, CustomerCreate, CustomerPublic


class CustomerNotFoundError(ApiError):
    status_code = 404
    documented = "No customer has this id; nothing was written"

    def __init__(self, customer_id: int) -> None:
        super().__init__(f"Customer {customer_id} not found")


class EmailTakenError(ApiError):
    status_code = 409
    documented = "A customer already has this email (ignoring letter case)"

    def __init__(self, email: str) -> None:
        super().__init__(f"A customer with the email {email} already exists")


async def create_customer(session: AsyncSession, request: CustomerCreate) -> CustomerPublic:
    """Insert a customer; an email already taken, in any letter case, is a 409 (the unique
    index on its lower-cased form decides, so two concurrent creates cannot both win)."""

    async def insert() -> Customer:
        customer = Customer(
            customer_name=request.customer_name, customer_email=request.customer_email
        )
        session.add(customer)
        try:
            await session.commit()
        except IntegrityError as error:
            if not is_duplicate_key(error):
                raise
            raise EmailTakenError(request.customer_email) from None
        return customer

    # On a cluster, the same email inserted on another node at the same moment fails
    # certification (a lost race), not the unique index; the next try meets the index.
    customer = await retry_conflicts(session, insert)
    logger.info("customer {} created", customer.customer_id)
    assert customer.customer_id is not None  # the insert's generated id
    return CustomerPublic(
        customer_id=customer.customer_id,
        customer_name=customer.customer_name,
        customer_email=customer.customer_email,
    )


CUSTOMER_COLUMNS = (
    col(Customer.customer_id),
    col(Customer.customer_name),
    col(Customer.customer_email),
)
READ_CUSTOMER = select(*CUSTOMER_COLUMNS).where(
    col(Customer.customer_id) == bindparam("customer_id")
)
COUNT_CUSTOMERS = select(func.count()).select_from(Customer)
CUSTOMERS_PAGE = (
    select(*CUSTOMER_COLUMNS)
    .order_by(col(Customer.customer_id))
    .offset(bindparam("offset", type_=Integer))
    .limit(bindparam("limit", type_=Integer))
)


async def get_customer_or_404(db: Database, customer_id: int) -> CustomerPublic:
    row = (await execute_core(db, READ_CUSTOMER, {"customer_id": customer_id})).first()
    if row is None:
        raise CustomerNotFoundError(customer_id)
    return CustomerPublic.model_validate(dict(row._mapping))


async def list_customers(db: Database, params: Params) -> Page[CustomerPublic]:
    """By customerId; a customer list is small next to invoices, so COUNT(*) is fine."""
    raw = params.to_raw_params().as_limit_offset()
    total = (await execute_core(db, COUNT_CUSTOMERS)).scalar_one()
    page = {"offset": raw.offset or 0, "limit": raw.limit}
    rows = await execute_core(db, CUSTOMERS_PAGE, page)
    items = [CustomerPublic.model_validate(dict(row._mapping)) for row in rows]
    return create_page(items, total=total, params=params)  # type: ignore[return-value]
